"""coloft: COLO fault tolerance manager for QEMU."""
