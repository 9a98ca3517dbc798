/*
 * The fence around src/core/: every header of this folder includes this
 * one first. Those headers are libvdisk's internals (the node structure,
 * the driver vtable, the request path); only the library's own sources
 * and its white-box unit tests, which define VDISK_INTERNAL, may use
 * them. src/nbd/, src/qmp/ and tools/ are built against the public API
 * in include/vdisk/ alone, and this makes reaching past it a compile
 * error instead of a quiet dependency on internals (docs/architecture.md,
 * "The library").
 */
#ifndef VDISK_INTERNAL
#error "src/core/ headers are internal to libvdisk: use include/vdisk/"
#endif
