"""Layer views without FUSE: the inode arithmetic of ``layers/`` and the ``Views`` rules
(names, slots, generations, which open view refuses which job, which views a job ends),
over a stand-in chain that only has layer paths."""

from __future__ import annotations

import errno

import pytest

from chainfs import fs
from chainfs.control import CommandError
from chainfs.views import View, ViewError, Views, view_name

from .fake_chain import SIZE, FakeChain, FakeLayer


def chain_of(*names: str) -> FakeChain:
    """Active layer first, as ``Chain.layers``."""
    return FakeChain([FakeLayer(f"/img/{n}.qcow2") for n in names])


def seed() -> tuple[FakeChain, Views]:
    chain = chain_of("E", "D", "C", "B", "A")
    return chain, Views("vm1", chain)  # type: ignore[arg-type]


def names(views: Views) -> list[str]:
    return [v.name for v in views.listing]


def view(views: Views, letter: str) -> View:
    return views.by_name[f"{letter}.qcow2.img"]


def test_view_inodes_round_trip_and_stay_clear_of_the_other_inodes() -> None:
    for index in (0, 1, 9999):
        assert fs.split_view_inode(fs.view_inode(index, None)) == (index, None)
        for slot in (0, 1, 999, fs.PER_CHAIN_VIEWS - 2):
            assert fs.split_view_inode(fs.view_inode(index, slot)) == (index, slot)
    # the fixed inodes and the chains' blocks (even for a million chains) lie below
    for inode in (fs.ROOT, fs.CONTROL, fs.STATUS, fs.LAYERS):
        assert fs.split_view_inode(inode) is None
    assert fs.FIRST_CHAIN + 1_000_000 * fs.PER_CHAIN < fs.FIRST_VIEW
    # neighbouring chains' blocks do not overlap
    assert fs.view_inode(0, fs.PER_CHAIN_VIEWS - 2) < fs.view_inode(1, None)
    with pytest.raises(Exception, match="slot"):
        fs.view_inode(0, fs.PER_CHAIN_VIEWS - 1)


def test_every_layer_has_a_view_named_after_its_file() -> None:
    _, views = seed()
    assert view_name("/img/B.qcow2") == "B.qcow2.img"
    assert names(views) == [f"{x}.qcow2.img" for x in "EDCBA"]
    assert views.is_active(view(views, "E"))
    assert not views.is_active(view(views, "D"))
    assert [views.level(view(views, x)) for x in "EDCBA"] == [0, 1, 2, 3, 4]
    # slots are distinct and found again by slot
    slots = {v.slot for v in views.listing}
    assert len(slots) == 5
    assert all(views.by_slot[v.slot] is v for v in views.listing)


def test_a_view_reads_the_chain_from_its_layers_level() -> None:
    chain, views = seed()
    c = view(views, "C")
    views.open(c)
    views.read(c, 4096, 512)
    assert chain.reads == [(4096, 512, 2)]


def test_snapshot_keeps_every_view_and_adds_the_new_active_one() -> None:
    chain, views = seed()
    e = view(views, "E")
    views.open(e)
    chain.layers.insert(0, FakeLayer("/img/F.qcow2"))
    views.refresh()
    assert names(views)[0] == "F.qcow2.img"
    assert view(views, "E") is e and e.alive  # the old active view, now a backing one
    assert not views.is_active(e)
    assert views.is_active(view(views, "F"))
    assert views.level(e) == 1


def test_an_open_view_refuses_a_job_writing_a_layer_it_reads() -> None:
    _, views = seed()
    c = view(views, "C")
    views.open(c)
    with pytest.raises(CommandError) as e:
        views.refuse("commit-1", ["/img/B.qcow2"])  # commit into B: C reads B
    assert e.value.errno == errno.EBUSY
    assert "layers/vm1/C.qcow2.img is open" in str(e.value)
    with pytest.raises(CommandError):
        views.refuse("stream-1", ["/img/C.qcow2"])  # stream node=C: into C itself
    # a job writing only above it, or a closed view, changes nothing it shows
    views.refuse("stream-2", ["/img/D.qcow2"])
    views.job_ended()
    views.release(c)
    views.refuse("commit-3", ["/img/B.qcow2"])


def test_the_active_view_never_refuses_a_job_but_ends_with_it() -> None:
    _, views = seed()
    e = view(views, "E")
    views.open(e)
    views.refuse("stream-1", ["/img/E.qcow2"])  # stream into the active layer
    views.read(e, 0, 512)  # while the job runs, the flat file's content
    views.job_ended()
    with pytest.raises(ViewError) as err:
        views.read(e, 0, 512)
    assert err.value.errno == errno.EIO
    fresh = view(views, "E")
    assert fresh is not e and fresh.slot == e.slot  # same name, same inode, new view


def test_a_view_cannot_be_opened_while_a_job_writes_what_it_reads() -> None:
    _, views = seed()
    views.refuse("commit-1", ["/img/B.qcow2"])
    with pytest.raises(ViewError) as e:
        views.open(view(views, "C"))
    assert e.value.errno == errno.EBUSY
    views.open(view(views, "A"))  # below the base: unchanged
    views.open(view(views, "E"))  # the active layer's: the flat file's content


def test_commit_ends_the_views_reading_its_base_and_drops_the_invalid_layers() -> None:
    chain, views = seed()
    d, b, a = view(views, "D"), view(views, "B"), view(views, "A")
    views.refuse("commit-1", ["/img/B.qcow2"])  # commit top=D base=B
    del chain.layers[1:3]  # [A] <- [B] <- [E]
    views.refresh()
    assert names(views) == ["E.qcow2.img", "B.qcow2.img", "A.qcow2.img"]
    assert "C.qcow2.img" not in views.by_name and "D.qcow2.img" not in views.by_name
    assert not d.alive and not b.alive and a.alive
    assert view(views, "A") is a
    assert view(views, "B").slot == b.slot


def test_a_failed_or_cancelled_job_ends_the_views_it_wrote_under() -> None:
    _, views = seed()
    c, d = view(views, "C"), view(views, "D")
    views.refuse("commit-1", ["/img/C.qcow2"])
    views.job_ended()  # no change of shape, but C got some of D's data
    assert not c.alive and not d.alive
    assert names(views) == [f"{x}.qcow2.img" for x in "EDCBA"]


def test_stream_keeps_the_removed_layers_views() -> None:
    chain, views = seed()
    c = view(views, "C")
    views.open(c)
    views.refuse("stream-1", ["/img/D.qcow2"])  # stream node=D base=B
    del chain.layers[2]  # [A] <- [B] <- [D] <- [E]
    views.refresh()
    assert names(views) == [f"{x}.qcow2.img" for x in "EDBA"] + ["C.qcow2.img"]
    assert view(views, "C") is c and c.alive and c.retired
    assert c.paths is not None and c.paths[c.level :] == [f"/img/{x}.qcow2" for x in "CBA"]
    assert views.size(c) == SIZE
    # a later commit into B changes what C shows: refused while open, then it ends
    with pytest.raises(CommandError):
        views.refuse("commit-2", ["/img/B.qcow2"])
    views.release(c)
    views.refuse("commit-2", ["/img/B.qcow2"])
    views.job_ended()
    assert not c.alive and "C.qcow2.img" not in views.by_name


def test_a_chain_of_1000_layers_has_1000_views_found_by_name() -> None:
    chain = chain_of(*[f"L{i:04d}" for i in range(999, -1, -1)])
    views = Views("deep", chain)  # type: ignore[arg-type]
    assert len(views.listing) == 1000
    top = views.by_name["L0999.qcow2.img"]
    assert views.is_active(top) and views.level(views.by_name["L0000.qcow2.img"]) == 999


def test_a_layer_whose_name_an_upper_layer_repeats_has_no_view() -> None:
    chain, views = seed()
    d = view(views, "D")
    chain.layers.insert(0, FakeLayer("/other/D.qcow2"))  # a snapshot into another directory
    views.refresh()
    assert names(views) == [f"{x}.qcow2.img" for x in "DECBA"]
    assert view(views, "D").path == "/other/D.qcow2" and view(views, "D").slot == d.slot
    assert not d.alive
