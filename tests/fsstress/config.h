/*
 * Hand-written stand-in for the config.h that xfstests' configure generates, for
 * building fsstress.c alone on Debian 12 (glibc 2.36, Linux headers, xfslibs-dev).
 * Only the HAVE_* switches global.h and fsstress.c look at are set.  Part of chainfs
 * (GPL-2.0-or-later); see README.md in this directory.
 */
#define HAVE_SYS_TYPES_H 1
#define HAVE_SYS_STAT_H 1
#define HAVE_SYS_STATVFS_H 1
#define HAVE_SYS_TIME_H 1
#define HAVE_SYS_IOCTL_H 1
#define HAVE_SYS_WAIT_H 1
#define HAVE_MALLOC_H 1
#define HAVE_DIRENT_H 1
#define HAVE_STDLIB_H 1
#define HAVE_UNISTD_H 1
#define HAVE_ERRNO_H 1
#define HAVE_STRING_H 1
#define HAVE_SYS_FCNTL_H 1
#define HAVE_SYS_PARAM_H 1
#define HAVE_LIBGEN_H 1
#define HAVE_ASSERT_H 1
#define STDC_HEADERS 1
#define HAVE_STRINGS_H 1
#define HAVE_LINUX_FALLOC_H 1
#define HAVE_SYS_MMAN_H 1
#define HAVE_LINUX_FIEMAP_H 1
#define HAVE_SYS_PRCTL_H 1
#define HAVE_RENAMEAT2 1
/* from Debian's xfslibs-dev: <xfs/xfs.h> (xfsctl, the XFS ioctls) and <xfs/jdm.h> */
#define HAVE_XFS_XFS_H 1
#define HAVE_XFS_JDM_H 1
