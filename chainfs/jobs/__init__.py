"""Live block operations: a generic job with QEMU's states, and one module per operation."""
