/*
 * vdisk's Python bindings: the module `vdisk`, a thin layer on the public
 * C API (include/vdisk/vdisk.h, bitmap.h, job.h) in the manner of
 * libnbd's Python bindings: one method per C call, arguments checked and
 * converted, every negative errno raised as vdisk.Error (an OSError
 * carrying the errno and the library's one-line message). docs/python.md
 * is the reference.
 *
 * Objects: Node (an open image, or a node borrowed from one's graph),
 * Job (a running block job), Extent (one answer of block_status) and the
 * iterator that walks block_status over a range.
 *
 * Threads and the GIL: every call that may do I/O or wait (reads,
 * writes, flushes, opening and closing, snapshots, bitmaps, starting and
 * waiting for jobs) releases the GIL, so several Python threads can keep
 * requests in flight on one node as the C API allows. A Node counts the
 * calls running without the GIL (on its owning, opened Node) and close()
 * refuses while any runs or while a job that uses it has not ended, so
 * the vd_node never goes away under a request; both counters are only
 * touched with the GIL held. A Job holds references to its Nodes, so no
 * node of a running job is closed by garbage collection; dropping the
 * last reference to a Job that has not ended cancels it and waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vdisk/bitmap.h"
#include "vdisk/job.h"
#include "vdisk/vdisk.h"

static PyObject *VdiskError;
static PyTypeObject NodeType;
static PyTypeObject JobType;
static PyTypeObject BlockStatusIterType;
static PyTypeObject ExtentType;

/* ---- errors ---------------------------------------------------------- */

/* A C string as str; library messages and file names are UTF-8 in
 * practice, but a byte that is not must not turn the error into another
 * error. */
static PyObject *str_of(const char *s)
{
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace");
}

/* Raises vdisk.Error(errno, message) for the C call that returned @ret
 * (a negative errno) and filled @err; .message is the library's message
 * (strerror when it gave none), .hint its hint line or None. */
static PyObject *raise_error(int ret, const vd_error *err)
{
    int e = ret < 0 ? -ret : EIO;
    const char *msg = err && err->code && err->message[0] ? err->message
                                                          : strerror(e);
    PyObject *m = str_of(msg);
    if (!m)
        return NULL;
    PyObject *exc = PyObject_CallFunction(VdiskError, "iO", e, m);
    if (exc) {
        PyObject *hint = err && err->code && err->hint[0] ? str_of(err->hint)
                                                          : Py_NewRef(Py_None);
        if (hint && PyObject_SetAttrString(exc, "message", m) == 0 &&
            PyObject_SetAttrString(exc, "hint", hint) == 0)
            PyErr_SetObject(VdiskError, exc);
        Py_XDECREF(hint);
        Py_DECREF(exc);
    }
    Py_DECREF(m);
    return NULL;
}

/* vdisk.Error for a fault found here rather than by the library. */
static PyObject *raise_msg(int e, const char *msg)
{
    vd_error err = VD_ERROR_INIT;
    vd_error_set(&err, -e, "%s", msg);
    return raise_error(-e, &err);
}

/* ---- argument converters (for "O&") --------------------------------- */

/* A non-negative int that fits 64 bits (offsets, lengths, sizes). */
static int conv_u64(PyObject *o, void *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "an integer is required, not %s",
                     Py_TYPE(o)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError,
                            "offsets and lengths are integers from 0 to "
                            "2**64-1");
        }
        return 0;
    }
    *(uint64_t *)out = v;
    return 1;
}

/* None, or a str (UTF-8) / bytes / os.PathLike kept as bytes in
 * *(PyObject **)out, which the caller releases; the C string is
 * PyBytes_AS_STRING of it. */
static int conv_opt_path(PyObject *o, void *out)
{
    PyObject **res = out;
    if (o == NULL) {            /* the cleanup call of "O&" */
        Py_CLEAR(*res);
        return 1;
    }
    if (o == Py_None) {
        *res = NULL;
        return 1;
    }
    if (!PyUnicode_FSConverter(o, res))
        return 0;
    return Py_CLEANUP_SUPPORTED;
}

static const char *cstr(PyObject *bytes)
{
    return bytes ? PyBytes_AS_STRING(bytes) : NULL;
}

/* ---- options: a dict to a vd_opts ------------------------------------ */

/* Adds the members of @dict to @o; a nested dict gives dotted keys
 * ({"file": {"locking": "off"}} is file.locking=off), True and False are
 * "on" and "off", numbers and paths their text. */
static int opts_add(vd_opts *o, const char *prefix, PyObject *dict)
{
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) {
            PyErr_SetString(PyExc_TypeError, "option names must be str");
            return -1;
        }
        const char *ks = PyUnicode_AsUTF8(k);
        if (!ks)
            return -1;
        PyObject *key = prefix ? PyUnicode_FromFormat("%s.%s", prefix, ks)
                               : Py_NewRef(k);
        if (!key)
            return -1;
        const char *full = PyUnicode_AsUTF8(key);
        int r = -1;
        if (!full) {
            /* error set */
        } else if (PyDict_Check(v)) {
            r = opts_add(o, full, v);
        } else {
            PyObject *text = NULL;
            const char *vs = NULL;
            if (v == Py_True) {
                vs = "on";
            } else if (v == Py_False) {
                vs = "off";
            } else if (PyUnicode_Check(v)) {
                vs = PyUnicode_AsUTF8(v);
            } else if (PyLong_Check(v)) {
                text = PyObject_Str(v);
                vs = text ? PyUnicode_AsUTF8(text) : NULL;
            } else if (PyBytes_Check(v) || PyObject_HasAttrString(v,
                                                           "__fspath__")) {
                if (PyUnicode_FSConverter(v, &text))
                    vs = PyBytes_AS_STRING(text);
            } else {
                PyErr_Format(PyExc_TypeError, "option '%s': a str, int, "
                             "bool, path or dict is required, not %s", full,
                             Py_TYPE(v)->tp_name);
            }
            if (vs) {
                int ret = vd_opts_set(o, full, vs);
                if (ret < 0)
                    raise_error(ret, NULL);
                else
                    r = 0;
            }
            Py_XDECREF(text);
        }
        Py_DECREF(key);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* A new vd_opts from None (an empty set) or a dict; NULL with an
 * exception set. */
static vd_opts *opts_from(PyObject *dict)
{
    if (dict && dict != Py_None && !PyDict_Check(dict)) {
        PyErr_SetString(PyExc_TypeError, "options must be a dict or None");
        return NULL;
    }
    vd_opts *o = vd_opts_new();
    if (!o) {
        PyErr_NoMemory();
        return NULL;
    }
    if (dict && dict != Py_None && opts_add(o, NULL, dict) < 0) {
        vd_opts_free(&o);
        return NULL;
    }
    return o;
}

/* ---- Node ------------------------------------------------------------ */

typedef struct JobObject JobObject;

/*
 * An opened node (owner NULL) holds the vd_node until close(). A
 * borrowed node (a child of another's graph) holds a reference to its
 * owner and the node's unique name, and looks the node up at every call,
 * so a node a job dropped from the chain answers "no longer exists"
 * rather than being used after it was freed.
 */
typedef struct NodeObject {
    PyObject_HEAD
    vd_node *node;              /* opened: the node; NULL once closed */
    struct NodeObject *owner;   /* borrowed: the opened Node */
    char *name;                 /* borrowed: the node's name */
    int inflight;               /* opened: calls running without the GIL */
    int exclusive;              /* opened: one of them must run alone */
    JobObject **jobs;           /* opened: the Jobs that use it */
    size_t njobs;
} NodeObject;

static NodeObject *root_of(NodeObject *self)
{
    return self->owner ? self->owner : self;
}

/* The vd_node of @self, or NULL with an exception. */
static vd_node *node_get(NodeObject *self)
{
    NodeObject *root = root_of(self);
    if (!root->node) {
        PyErr_SetString(PyExc_ValueError,
                        "I/O operation on a closed vdisk node");
        return NULL;
    }
    if (!self->owner)
        return self->node;
    vd_node *n = self->name ? vd_find_node(self->name) : NULL;
    if (!n) {
        char msg[300];
        snprintf(msg, sizeof(msg), "node '%s' no longer exists",
                 self->name ? self->name : "?");
        raise_msg(ENOENT, msg);
    }
    return n;
}

/*
 * node_get() for a call that will release the GIL: counts it on the
 * owner until node_leave(). An @exclusive call (truncate, snapshot
 * create, revert, delete: the C API wants no request of the caller's
 * own racing them) starts only when no other call runs on the node's
 * graph, and no other starts until it is over; either refusal is
 * vdisk.Error EBUSY, never a wait (the GIL is held here).
 */
static vd_node *node_enter_mode(NodeObject *self, bool exclusive)
{
    NodeObject *root = root_of(self);
    vd_node *n = node_get(self);
    if (!n)
        return NULL;
    if (root->exclusive || (exclusive && root->inflight)) {
        raise_msg(EBUSY, root->exclusive
                  ? "the node is being truncated or snapshotted in another "
                    "thread"
                  : "the node has requests in flight in other threads");
        return NULL;
    }
    root->inflight++;
    root->exclusive = exclusive;
    return n;
}

static vd_node *node_enter(NodeObject *self)
{
    return node_enter_mode(self, false);
}

static void node_leave(NodeObject *self)
{
    NodeObject *root = root_of(self);
    root->inflight--;
    root->exclusive = 0;
}

/* Runs CALL, an int expression that may use `n` (the node of SELF),
 * with the GIL released and the call counted on the node (node_enter());
 * the enclosing function returns NULL when the node is closed. */
#define NODE_NOGIL_MODE(self, ret, call, excl)                             \
    do {                                                                   \
        vd_node *n = node_enter_mode(self, excl);                          \
        if (!n)                                                            \
            return NULL;                                                   \
        Py_BEGIN_ALLOW_THREADS                                             \
        ret = (call);                                                      \
        Py_END_ALLOW_THREADS                                               \
        node_leave(self);                                                  \
    } while (0)
#define NODE_NOGIL(self, ret, call) NODE_NOGIL_MODE(self, ret, call, false)
#define NODE_NOGIL_EXCL(self, ret, call) NODE_NOGIL_MODE(self, ret, call, true)

/* None, or vdisk.Error for a failed call. */
static PyObject *none_or_raise(int ret, const vd_error *err)
{
    if (ret < 0)
        return raise_error(ret, err);
    Py_RETURN_NONE;
}

/* A Node for @n, borrowed from @owner's graph; None when @n is NULL. */
static PyObject *node_borrowed(NodeObject *owner, vd_node *n)
{
    if (!n)
        Py_RETURN_NONE;
    owner = root_of(owner);
    if (n == owner->node)
        return Py_NewRef((PyObject *)owner);
    NodeObject *b = PyObject_New(NodeObject, &NodeType);
    if (!b)
        return NULL;
    b->node = NULL;
    b->owner = (NodeObject *)Py_NewRef((PyObject *)owner);
    b->name = strdup(vd_node_name(n));
    b->inflight = 0;
    b->exclusive = 0;
    b->jobs = NULL;
    b->njobs = 0;
    if (!b->name) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    return (PyObject *)b;
}

static int job_is_over(JobObject *j);

/* Closes an opened node: refused while a call runs without the GIL or a
 * job that uses the node has not ended. */
static int node_do_close(NodeObject *self)
{
    if (self->owner) {          /* borrowed: forget the name only */
        free(self->name);
        self->name = NULL;
        return 0;
    }
    if (!self->node)
        return 0;
    if (self->inflight) {
        raise_msg(EBUSY, "the node has requests in flight in other threads");
        return -1;
    }
    for (size_t i = 0; i < self->njobs; i++) {
        if (!job_is_over(self->jobs[i])) {
            raise_msg(EBUSY, "the node is used by a block job that has not "
                      "ended");
            return -1;
        }
    }
    vd_error err = VD_ERROR_INIT;
    vd_node *n = self->node;
    int ret;
    self->node = NULL;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_close(&n, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0) {
        raise_error(ret, &err);
        return -1;
    }
    return 0;
}

static void Node_dealloc(NodeObject *self)
{
    if (!self->owner && self->node) {
        vd_node *n = self->node;
        self->node = NULL;
        Py_BEGIN_ALLOW_THREADS
        vd_close(&n, NULL);
        Py_END_ALLOW_THREADS
    }
    free(self->name);
    PyMem_Free(self->jobs);
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static PyObject *Node_close(NodeObject *self, PyObject *unused)
{
    (void)unused;
    if (node_do_close(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Node_enter(NodeObject *self, PyObject *unused)
{
    (void)unused;
    if (!node_get(self))
        return NULL;
    return Py_NewRef((PyObject *)self);
}

static PyObject *Node_exit(NodeObject *self, PyObject *args)
{
    PyObject *exc_type = PyTuple_GET_SIZE(args) ? PyTuple_GET_ITEM(args, 0)
                                                : Py_None;
    if (node_do_close(self) < 0) {
        /* Leaving by an exception: that one is the news; a close that
         * cannot happen yet (a job still runs) is left to the collector. */
        if (exc_type == Py_None)
            return NULL;
        PyErr_Clear();
    }
    Py_RETURN_FALSE;
}

static PyObject *Node_repr(NodeObject *self)
{
    vd_node *n = root_of(self)->node ? (self->owner ?
        (self->name ? vd_find_node(self->name) : NULL) : self->node) : NULL;
    if (!n)
        return PyUnicode_FromString("<vdisk.Node (closed)>");
    return PyUnicode_FromFormat("<vdisk.Node '%s' %s %s>", vd_node_name(n),
                                vd_node_format(n), vd_node_filename(n));
}

/* read(offset, length) -> bytes */
static PyObject *Node_read(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "offset", "length", NULL };
    uint64_t off, len;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&:read", kwl, conv_u64,
                                     &off, conv_u64, &len))
        return NULL;
    if (len > (uint64_t)PY_SSIZE_T_MAX)
        return PyErr_NoMemory();
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (!b)
        return NULL;
    vd_node *n = node_enter(self);
    if (!n) {
        Py_DECREF(b);
        return NULL;
    }
    vd_error err = VD_ERROR_INIT;
    int ret;
    char *p = PyBytes_AS_STRING(b);
    Py_BEGIN_ALLOW_THREADS
    ret = vd_pread(n, p, len, off, 0, &err);
    Py_END_ALLOW_THREADS
    node_leave(self);
    if (ret < 0) {
        Py_DECREF(b);
        return raise_error(ret, &err);
    }
    return b;
}

/* A read into (or write from) the buffer @buf at @off without the GIL;
 * releases @buf. */
static PyObject *node_buf_io(NodeObject *self, Py_buffer *buf, uint64_t off,
                             bool write, unsigned flags)
{
    vd_error err = VD_ERROR_INIT;
    int ret = 0;
    vd_node *n = node_enter(self);
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        ret = write ? vd_pwrite(n, buf->buf, (uint64_t)buf->len, off, flags,
                                &err)
                    : vd_pread(n, buf->buf, (uint64_t)buf->len, off, flags,
                               &err);
        Py_END_ALLOW_THREADS
        node_leave(self);
    }
    PyBuffer_Release(buf);
    return n ? none_or_raise(ret, &err) : NULL;
}

/* pread_into(buf, offset): fills the writable buffer @buf, no copy. */
static PyObject *Node_pread_into(NodeObject *self, PyObject *args,
                                 PyObject *kw)
{
    static char *kwl[] = { "buf", "offset", NULL };
    Py_buffer buf;
    uint64_t off;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*O&:pread_into", kwl, &buf,
                                     conv_u64, &off))
        return NULL;
    return node_buf_io(self, &buf, off, false, 0);
}

/* write(buf, offset, fua=False) */
static PyObject *Node_write(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "buf", "offset", "fua", NULL };
    Py_buffer buf;
    uint64_t off;
    int fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*O&|p:write", kwl, &buf,
                                     conv_u64, &off, &fua))
        return NULL;
    return node_buf_io(self, &buf, off, true, fua ? VD_REQ_FUA : 0);
}

/* zero(offset, length, may_unmap=False, no_fallback=False, fua=False) */
static PyObject *Node_zero(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "offset", "length", "may_unmap", "no_fallback",
                           "fua", NULL };
    uint64_t off, len;
    int may_unmap = 0, no_fallback = 0, fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&|ppp:zero", kwl,
                                     conv_u64, &off, conv_u64, &len,
                                     &may_unmap, &no_fallback, &fua))
        return NULL;
    unsigned flags = (may_unmap ? VD_REQ_MAY_UNMAP : 0) |
                     (no_fallback ? VD_REQ_NO_FALLBACK : 0) |
                     (fua ? VD_REQ_FUA : 0);
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL(self, ret, vd_write_zeroes(n, len, off, flags, &err));
    return none_or_raise(ret, &err);
}

/* discard(offset, length) */
static PyObject *Node_discard(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "offset", "length", NULL };
    uint64_t off, len;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&:discard", kwl, conv_u64,
                                     &off, conv_u64, &len))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL(self, ret, vd_discard(n, len, off, &err));
    return none_or_raise(ret, &err);
}

static PyObject *Node_flush(NodeObject *self, PyObject *unused)
{
    (void)unused;
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL(self, ret, vd_flush(n, &err));
    return none_or_raise(ret, &err);
}

static const char *const prealloc_names[] = { "off", "metadata", "falloc",
                                              "full", NULL };

/* truncate(size, shrink=False, prealloc="off") */
static PyObject *Node_truncate(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "size", "shrink", "prealloc", NULL };
    uint64_t size;
    int shrink = 0;
    const char *pre = "off";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|ps:truncate", kwl,
                                     conv_u64, &size, &shrink, &pre))
        return NULL;
    int mode = -1;
    for (int i = 0; prealloc_names[i]; i++)
        if (!strcmp(pre, prealloc_names[i]))
            mode = i;
    if (mode < 0) {
        PyErr_Format(PyExc_ValueError, "prealloc must be one of off, "
                     "metadata, falloc, full, not '%s'", pre);
        return NULL;
    }
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL_EXCL(self, ret, vd_truncate(n, size, shrink,
                                           (vd_prealloc)mode, &err));
    return none_or_raise(ret, &err);
}

/* The node's length (vd_getlength() without the GIL) in @*out; -1 with
 * an exception. */
static int node_size(NodeObject *self, uint64_t *out)
{
    int64_t len;
    vd_node *n = node_enter(self);
    if (!n)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    len = vd_getlength(n);
    Py_END_ALLOW_THREADS
    node_leave(self);
    if (len < 0) {
        raise_error((int)len, NULL);
        return -1;
    }
    *out = (uint64_t)len;
    return 0;
}

static PyObject *Node_get_size(NodeObject *self, void *closure)
{
    (void)closure;
    uint64_t size;
    return node_size(self, &size) < 0 ? NULL
                                      : PyLong_FromUnsignedLongLong(size);
}

static PyObject *Node_get_name(NodeObject *self, void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? str_of(vd_node_name(n)) : NULL;
}

static PyObject *Node_get_format(NodeObject *self, void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? str_of(vd_node_format(n)) : NULL;
}

static PyObject *Node_get_filename(NodeObject *self, void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    if (!n)
        return NULL;
    const char *f = vd_node_filename(n);
    if (!f)
        Py_RETURN_NONE;
    return str_of(f);
}

static PyObject *Node_get_read_only(NodeObject *self, void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? PyBool_FromLong(vd_node_is_read_only(n)) : NULL;
}

static PyObject *Node_get_closed(NodeObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!root_of(self)->node ||
                           (self->owner && !self->name));
}

static PyObject *Node_get_backing(NodeObject *self, void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? node_borrowed(self, vd_node_child(n, "backing")) : NULL;
}

/* child(role) -> Node or None */
static PyObject *Node_child(NodeObject *self, PyObject *args)
{
    const char *role;
    if (!PyArg_ParseTuple(args, "s:child", &role))
        return NULL;
    vd_node *n = node_get(self);
    return n ? node_borrowed(self, vd_node_child(n, role)) : NULL;
}

/* vd_get_info() as JSON text in @*json (NULL when out of memory). */
static int info_json(vd_node *n, char **json, vd_error *err)
{
    vd_image_info *info = NULL;
    int ret = vd_get_info(n, &info, err);
    if (ret == 0) {
        *json = vd_image_info_to_json(info);
        vd_image_info_free(&info);
    }
    return ret;
}

/* info() -> dict: vd_get_info() as qemu-img info --output=json has it */
static PyObject *Node_info(NodeObject *self, PyObject *unused)
{
    (void)unused;
    vd_error err = VD_ERROR_INIT;
    char *json = NULL;
    int ret;
    NODE_NOGIL(self, ret, info_json(n, &json, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    if (!json)
        return PyErr_NoMemory();
    PyObject *mod = PyImport_ImportModule("json");
    PyObject *res = mod ? PyObject_CallMethod(mod, "loads", "s", json) : NULL;
    Py_XDECREF(mod);
    free(json);
    return res;
}

/* ---- block status ---------------------------------------------------- */

static PyStructSequence_Field extent_fields[] = {
    { "offset", "guest offset of the extent" },
    { "length", "bytes with the same status" },
    { "flags", "BLOCK_* bits" },
    { "depth", "the backing-chain layer that decided (0: this node)" },
    { "host_offset", "offset in the file holding the data, or None" },
    { NULL, NULL },
};

static PyStructSequence_Desc extent_desc = {
    "vdisk.Extent",
    "One extent of block_status(): a 3-tuple (offset, length, flags) with "
    "the further attributes depth and host_offset.",
    extent_fields,
    3,
};

typedef struct {
    PyObject_HEAD
    NodeObject *node;
    uint64_t pos, end;
} BlockStatusIter;

static void BlockStatusIter_dealloc(BlockStatusIter *self)
{
    Py_XDECREF(self->node);
    PyObject_Free(self);
}

static PyObject *BlockStatusIter_next(BlockStatusIter *self)
{
    if (self->pos >= self->end)
        return NULL;            /* StopIteration */
    vd_node *n = node_enter(self->node);
    if (!n)
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_extent ext;
    int ret;
    uint64_t pos = self->pos, len = self->end - self->pos;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_block_status(n, pos, len, &ext, &err);
    Py_END_ALLOW_THREADS
    node_leave(self->node);
    if (ret < 0)
        return raise_error(ret, &err);
    if (ext.length == 0 || ext.length > len)
        return raise_msg(EIO, "block status returned an empty extent");
    self->pos = pos + ext.length;
    PyObject *e = PyStructSequence_New(&ExtentType);
    if (!e)
        return NULL;
    PyStructSequence_SetItem(e, 0, PyLong_FromUnsignedLongLong(pos));
    PyStructSequence_SetItem(e, 1, PyLong_FromUnsignedLongLong(ext.length));
    PyStructSequence_SetItem(e, 2, PyLong_FromUnsignedLong(ext.flags));
    PyStructSequence_SetItem(e, 3, PyLong_FromLong(ext.depth));
    PyStructSequence_SetItem(e, 4, (ext.flags & VD_BLOCK_OFFSET_VALID)
                             ? PyLong_FromUnsignedLongLong(ext.offset)
                             : Py_NewRef(Py_None));
    for (int i = 0; i < 5; i++) {
        if (!PyStructSequence_GetItem(e, i)) {
            Py_DECREF(e);
            return NULL;
        }
    }
    return e;
}

static PyTypeObject BlockStatusIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vdisk._BlockStatusIter",
    .tp_basicsize = sizeof(BlockStatusIter),
    .tp_dealloc = (destructor)BlockStatusIter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)BlockStatusIter_next,
};

/* block_status(offset=0, length=None) -> iterator of Extent */
static PyObject *Node_block_status(NodeObject *self, PyObject *args,
                                   PyObject *kw)
{
    static char *kwl[] = { "offset", "length", NULL };
    uint64_t off = 0, len = 0;
    PyObject *len_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O&O:block_status", kwl,
                                     conv_u64, &off, &len_o))
        return NULL;
    uint64_t size;
    if (node_size(self, &size) < 0)
        return NULL;
    if (len_o == Py_None)
        len = off < size ? size - off : 0;
    else if (!conv_u64(len_o, &len))
        return NULL;
    if (off > size || len > size - off)
        return raise_msg(EINVAL, "block status range is past the end of the "
                         "node");
    BlockStatusIter *it = PyObject_New(BlockStatusIter, &BlockStatusIterType);
    if (!it)
        return NULL;
    it->node = (NodeObject *)Py_NewRef((PyObject *)self);
    it->pos = off;
    it->end = off + len;
    return (PyObject *)it;
}

/* ---- snapshots ------------------------------------------------------- */

static PyObject *snapshot_dict(const vd_snapshot_info *s)
{
    return Py_BuildValue("{s:N,s:N,s:K,s:k,s:k,s:K,s:N,s:K}",
        "id", str_of(s->id ? s->id : ""),
        "name", str_of(s->name ? s->name : ""),
        "vm_state_size", (unsigned long long)s->vm_state_size,
        "date_sec", (unsigned long)s->date_sec,
        "date_nsec", (unsigned long)s->date_nsec,
        "vm_clock_nsec", (unsigned long long)s->vm_clock_nsec,
        "icount", s->icount == UINT64_MAX ? Py_NewRef(Py_None)
                  : PyLong_FromUnsignedLongLong(s->icount),
        "disk_size", (unsigned long long)s->disk_size);
}

/* A snapshot stamped now: vd_snapshot_create_simple(), or with an id
 * given vd_snapshot_create(). */
static int snapshot_create_now(vd_node *n, const char *name, const char *id,
                               vd_error *err)
{
    if (!id || !*id)
        return vd_snapshot_create_simple(n, name, err);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    vd_snapshot_info sn = { .id = (char *)id, .name = (char *)name,
                            .date_sec = (uint32_t)ts.tv_sec,
                            .date_nsec = (uint32_t)ts.tv_nsec,
                            .icount = UINT64_MAX };
    return vd_snapshot_create(n, &sn, err);
}

/* snapshot_create(name, id=None) */
static PyObject *Node_snapshot_create(NodeObject *self, PyObject *args,
                                      PyObject *kw)
{
    static char *kwl[] = { "name", "id", NULL };
    const char *name, *id = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|z:snapshot_create", kwl,
                                     &name, &id))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL_EXCL(self, ret, snapshot_create_now(n, name, id, &err));
    return none_or_raise(ret, &err);
}

static PyObject *Node_snapshot_list(NodeObject *self, PyObject *unused)
{
    (void)unused;
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_info *list = NULL;
    size_t count = 0;
    int ret;
    NODE_NOGIL(self, ret, vd_snapshot_list(n, &list, &count, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    PyObject *res = PyList_New(0);
    for (size_t i = 0; res && i < count; i++) {
        PyObject *d = snapshot_dict(&list[i]);
        if (!d || PyList_Append(res, d) < 0)
            Py_CLEAR(res);
        Py_XDECREF(d);
    }
    vd_snapshot_list_free(&list, count);
    return res;
}

/* snapshot_find(id=None, name=None) -> dict or None */
static PyObject *Node_snapshot_find(NodeObject *self, PyObject *args,
                                    PyObject *kw)
{
    static char *kwl[] = { "id", "name", NULL };
    const char *id = NULL, *name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zz:snapshot_find", kwl, &id,
                                     &name))
        return NULL;
    if (!id && !name) {
        PyErr_SetString(PyExc_TypeError, "snapshot_find() needs id or name");
        return NULL;
    }
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_info sn;
    int ret;
    memset(&sn, 0, sizeof(sn));
    NODE_NOGIL(self, ret, vd_snapshot_find(n, id, name, &sn, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    if (ret == 0)
        Py_RETURN_NONE;
    PyObject *d = snapshot_dict(&sn);
    vd_snapshot_info_clear(&sn);
    return d;
}

/* snapshot_delete(id=None, name=None): the C API's order */
static PyObject *Node_snapshot_delete(NodeObject *self, PyObject *args,
                                      PyObject *kw)
{
    static char *kwl[] = { "id", "name", NULL };
    const char *id = NULL, *name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zz:snapshot_delete", kwl,
                                     &id, &name))
        return NULL;
    if (!id && !name) {
        PyErr_SetString(PyExc_TypeError,
                        "snapshot_delete() needs id or name");
        return NULL;
    }
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL_EXCL(self, ret, vd_snapshot_delete(n, id, name, &err));
    return none_or_raise(ret, &err);
}

/* The calls that take one string: snapshot goto and load_tmp
 * (@exclusive, see node_enter_mode()), the bitmap verbs. */
static PyObject *call_by_name(NodeObject *self, PyObject *args,
                              const char *fmt, bool exclusive,
                              int (*fn)(vd_node *, const char *, vd_error *))
{
    const char *s;
    if (!PyArg_ParseTuple(args, fmt, &s))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    int ret;
    NODE_NOGIL_MODE(self, ret, fn(n, s, &err), exclusive);
    return none_or_raise(ret, &err);
}

static PyObject *Node_snapshot_goto(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:snapshot_goto", true,
                        vd_snapshot_goto);
}

static PyObject *Node_snapshot_load_tmp(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:snapshot_load_tmp", true,
                        vd_snapshot_load_tmp_by_id_or_name);
}

/* ---- compact --------------------------------------------------------- */

/* vd_compact()'s progress, called without the GIL from the compacting
 * thread: the callable gets the percentage. The first exception it
 * raises is kept and raised when compact returns (a compaction is
 * crash-safe but not cancellable, so it runs to its end); an error of
 * the compaction itself is raised instead. */
typedef struct {
    PyObject *callable;
    /* The first exception raised (type NULL: none), as PyErr_Fetch()
     * gives it (Debian 12's Python 3.11 has no PyErr_GetRaisedException). */
    PyObject *exc_type, *exc_value, *exc_tb;
} compact_progress;

static void compact_progress_cb(double percent, void *opaque)
{
    compact_progress *p = opaque;
    PyGILState_STATE g = PyGILState_Ensure();

    if (!p->exc_type) {
        PyObject *r = PyObject_CallFunction(p->callable, "d", percent);
        if (r)
            Py_DECREF(r);
        else
            PyErr_Fetch(&p->exc_type, &p->exc_value, &p->exc_tb);
    }
    PyGILState_Release(g);
}

/* compact(dry_run=False, progress=None) -> dict */
static PyObject *Node_compact(NodeObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "dry_run", "progress", NULL };
    int dry_run = 0;
    PyObject *progress = Py_None;
    compact_progress p = { NULL, NULL, NULL, NULL };
    vd_compact_opts opts = { 0 };
    vd_compact_result res = { 0 };
    vd_error err = VD_ERROR_INIT;
    int ret;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pO:compact", kwl, &dry_run,
                                     &progress))
        return NULL;
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable");
        return NULL;
    }
    p.callable = progress;
    opts.dry_run = dry_run;
    NODE_NOGIL_EXCL(self, ret,
                    vd_compact(n, &opts,
                               progress != Py_None ? compact_progress_cb
                                                   : NULL,
                               &p, &res, &err));
    if (ret < 0) {
        /* The compaction's own error says more than the callback's. */
        Py_XDECREF(p.exc_type);
        Py_XDECREF(p.exc_value);
        Py_XDECREF(p.exc_tb);
        return raise_error(ret, &err);
    }
    if (p.exc_type) {
        PyErr_Restore(p.exc_type, p.exc_value, p.exc_tb);
        return NULL;
    }
    return Py_BuildValue("{s:K,s:K,s:K,s:K}",
        "original_size", (unsigned long long)res.original_size,
        "new_size", (unsigned long long)res.new_size,
        "moved_clusters", (unsigned long long)res.moved_clusters,
        "cluster_size", (unsigned long long)res.cluster_size);
}

/* ---- bitmaps --------------------------------------------------------- */

static PyObject *bitmap_dict(const vd_bitmap_info *b)
{
    return Py_BuildValue("{s:N,s:K,s:K,s:O,s:O,s:O,s:O,s:O}",
        "name", str_of(b->name ? b->name : ""),
        "granularity", (unsigned long long)b->granularity,
        "count", (unsigned long long)b->count,
        "recording", b->recording ? Py_True : Py_False,
        "busy", b->busy ? Py_True : Py_False,
        "persistent", b->persistent ? Py_True : Py_False,
        "inconsistent", b->inconsistent ? Py_True : Py_False,
        "readonly", b->readonly ? Py_True : Py_False);
}

/* bitmap_add(name, granularity=0, persistent=False, disabled=False) */
static PyObject *Node_bitmap_add(NodeObject *self, PyObject *args,
                                 PyObject *kw)
{
    static char *kwl[] = { "name", "granularity", "persistent", "disabled",
                           NULL };
    const char *name;
    uint64_t gran = 0;
    int persistent = 0, disabled = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|O&pp:bitmap_add", kwl,
                                     &name, conv_u64, &gran, &persistent,
                                     &disabled))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    int ret;
    unsigned flags = (persistent ? VD_BITMAP_PERSISTENT : 0) |
                     (disabled ? VD_BITMAP_DISABLED : 0);
    NODE_NOGIL(self, ret, vd_bitmap_add(n, name, gran, flags, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

static PyObject *Node_bitmap_remove(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:bitmap_remove", false,
                        vd_bitmap_remove);
}

static PyObject *Node_bitmap_clear(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:bitmap_clear", false,
                        vd_bitmap_clear);
}

static PyObject *Node_bitmap_enable(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:bitmap_enable", false,
                        vd_bitmap_enable);
}

static PyObject *Node_bitmap_disable(NodeObject *self, PyObject *args)
{
    return call_by_name(self, args, "s:bitmap_disable", false,
                        vd_bitmap_disable);
}

/* bitmap_merge(target, sources): each source a name of this node's
 * bitmaps or a (Node, name) pair. */
static PyObject *Node_bitmap_merge(NodeObject *self, PyObject *args,
                                   PyObject *kw)
{
    static char *kwl[] = { "target", "sources", NULL };
    const char *target;
    PyObject *sources;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO:bitmap_merge", kwl,
                                     &target, &sources))
        return NULL;
    PyObject *seq = PySequence_Fast(sources, "sources must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t cnt = PySequence_Fast_GET_SIZE(seq);
    vd_bitmap_ref *refs = PyMem_Calloc(cnt ? (size_t)cnt : 1, sizeof(*refs));
    NodeObject **owners = PyMem_Calloc(cnt ? (size_t)cnt : 1,
                                       sizeof(*owners));
    PyObject *res = NULL;
    Py_ssize_t entered = 0;
    vd_node *n = NULL;
    if (!refs || !owners) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < cnt; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        NodeObject *owner = self;
        PyObject *name_o = it;
        if (PyTuple_Check(it)) {
            if (PyTuple_GET_SIZE(it) != 2 ||
                !PyObject_TypeCheck(PyTuple_GET_ITEM(it, 0), &NodeType)) {
                PyErr_SetString(PyExc_TypeError,
                                "a merge source is a name or (Node, name)");
                goto out;
            }
            owner = (NodeObject *)PyTuple_GET_ITEM(it, 0);
            name_o = PyTuple_GET_ITEM(it, 1);
        }
        if (!PyUnicode_Check(name_o)) {
            PyErr_SetString(PyExc_TypeError, "bitmap names are str");
            goto out;
        }
        refs[i].name = PyUnicode_AsUTF8(name_o);
        if (!refs[i].name)
            goto out;
        refs[i].node = node_enter(owner);
        if (!refs[i].node)
            goto out;
        owners[i] = owner;
        entered = i + 1;
    }
    n = node_enter(self);
    if (!n)
        goto out;
    vd_error err = VD_ERROR_INIT;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_bitmap_merge(n, target, refs, (size_t)cnt, &err);
    Py_END_ALLOW_THREADS
    node_leave(self);
    if (ret < 0)
        raise_error(ret, &err);
    else
        res = Py_NewRef(Py_None);
out:
    for (Py_ssize_t i = 0; i < entered; i++)
        node_leave(owners[i]);
    PyMem_Free(refs);
    PyMem_Free(owners);
    Py_DECREF(seq);
    return res;
}

static PyObject *Node_bitmap_list(NodeObject *self, PyObject *unused)
{
    (void)unused;
    vd_error err = VD_ERROR_INIT;
    vd_bitmap_info *list = NULL;
    size_t count = 0;
    int ret;
    NODE_NOGIL(self, ret, vd_bitmap_list(n, &list, &count, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    PyObject *res = PyList_New(0);
    for (size_t i = 0; res && i < count; i++) {
        PyObject *d = bitmap_dict(&list[i]);
        if (!d || PyList_Append(res, d) < 0)
            Py_CLEAR(res);
        Py_XDECREF(d);
    }
    vd_bitmap_list_free(list, count);
    return res;
}

/* bitmap_info(name) -> dict */
static PyObject *Node_bitmap_info(NodeObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:bitmap_info", &name))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_bitmap_info info;
    int ret;
    memset(&info, 0, sizeof(info));
    NODE_NOGIL(self, ret, vd_bitmap_get_info(n, name, &info, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    PyObject *d = bitmap_dict(&info);
    free(info.name);
    return d;
}

/* bitmap_dirty(name, offset=0) -> list of (start, length), walked with
 * vd_bitmap_next_dirty() */
static PyObject *Node_bitmap_dirty(NodeObject *self, PyObject *args,
                                   PyObject *kw)
{
    static char *kwl[] = { "name", "offset", NULL };
    const char *name;
    uint64_t off = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|O&:bitmap_dirty", kwl,
                                     &name, conv_u64, &off))
        return NULL;
    PyObject *res = PyList_New(0);
    if (!res)
        return NULL;
    for (;;) {
        vd_node *n = node_enter(self);
        if (!n)
            goto fail;
        vd_error err = VD_ERROR_INIT;
        uint64_t start = 0, bytes = 0;
        int ret;
        Py_BEGIN_ALLOW_THREADS
        ret = vd_bitmap_next_dirty(n, name, off, &start, &bytes, &err);
        Py_END_ALLOW_THREADS
        node_leave(self);
        if (ret < 0) {
            raise_error(ret, &err);
            goto fail;
        }
        if (ret == 0 || bytes == 0)
            break;
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)start,
                                    (unsigned long long)bytes);
        if (!t || PyList_Append(res, t) < 0) {
            Py_XDECREF(t);
            goto fail;
        }
        Py_DECREF(t);
        off = start + bytes;
    }
    return res;
fail:
    Py_DECREF(res);
    return NULL;
}

/* bitmap_sha256(name) -> str (QEMU's x-debug-block-dirty-bitmap-sha256) */
static PyObject *Node_bitmap_sha256(NodeObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:bitmap_sha256", &name))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    char out[65];
    int ret;
    NODE_NOGIL(self, ret, vd_bitmap_sha256(n, name, out, &err));
    if (ret < 0)
        return raise_error(ret, &err);
    return PyUnicode_FromString(out);
}

static PyObject *Node_get_bitmap_default_granularity(NodeObject *self,
                                                     void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? PyLong_FromUnsignedLongLong(vd_bitmap_default_granularity(n))
             : NULL;
}

static PyObject *Node_get_bitmap_supports_persistent(NodeObject *self,
                                                     void *closure)
{
    (void)closure;
    vd_node *n = node_get(self);
    return n ? PyBool_FromLong(vd_bitmap_supports_persistent(n)) : NULL;
}

static PyMethodDef Node_methods[] = {
    { "close", (PyCFunction)Node_close, METH_NOARGS,
      "close(): flush and close the image (vd_close)." },
    { "__enter__", (PyCFunction)Node_enter, METH_NOARGS, NULL },
    { "__exit__", (PyCFunction)Node_exit, METH_VARARGS, NULL },
    { "read", (PyCFunction)(void (*)(void))Node_read,
      METH_VARARGS | METH_KEYWORDS,
      "read(offset, length) -> bytes (vd_pread)." },
    { "pread_into", (PyCFunction)(void (*)(void))Node_pread_into,
      METH_VARARGS | METH_KEYWORDS,
      "pread_into(buf, offset): fill the writable buffer buf (vd_pread)." },
    { "write", (PyCFunction)(void (*)(void))Node_write,
      METH_VARARGS | METH_KEYWORDS,
      "write(buf, offset, fua=False) (vd_pwrite)." },
    { "zero", (PyCFunction)(void (*)(void))Node_zero,
      METH_VARARGS | METH_KEYWORDS,
      "zero(offset, length, may_unmap=False, no_fallback=False, fua=False) "
      "(vd_write_zeroes)." },
    { "discard", (PyCFunction)(void (*)(void))Node_discard,
      METH_VARARGS | METH_KEYWORDS,
      "discard(offset, length) (vd_discard)." },
    { "flush", (PyCFunction)Node_flush, METH_NOARGS, "flush() (vd_flush)." },
    { "truncate", (PyCFunction)(void (*)(void))Node_truncate,
      METH_VARARGS | METH_KEYWORDS,
      "truncate(size, shrink=False, prealloc='off') (vd_truncate)." },
    { "block_status", (PyCFunction)(void (*)(void))Node_block_status,
      METH_VARARGS | METH_KEYWORDS,
      "block_status(offset=0, length=None) -> iterator of Extent "
      "(vd_block_status)." },
    { "info", (PyCFunction)Node_info, METH_NOARGS,
      "info() -> dict: qemu-img info's ImageInfo (vd_get_info)." },
    { "child", (PyCFunction)Node_child, METH_VARARGS,
      "child(role) -> Node or None (vd_node_child)." },
    { "snapshot_create", (PyCFunction)(void (*)(void))Node_snapshot_create,
      METH_VARARGS | METH_KEYWORDS,
      "snapshot_create(name, id=None) (vd_snapshot_create[_simple])." },
    { "snapshot_list", (PyCFunction)Node_snapshot_list, METH_NOARGS,
      "snapshot_list() -> list of dict (vd_snapshot_list)." },
    { "snapshot_find", (PyCFunction)(void (*)(void))Node_snapshot_find,
      METH_VARARGS | METH_KEYWORDS,
      "snapshot_find(id=None, name=None) -> dict or None." },
    { "snapshot_delete", (PyCFunction)(void (*)(void))Node_snapshot_delete,
      METH_VARARGS | METH_KEYWORDS,
      "snapshot_delete(id=None, name=None) (vd_snapshot_delete)." },
    { "snapshot_goto", (PyCFunction)Node_snapshot_goto, METH_VARARGS,
      "snapshot_goto(id_or_name) (vd_snapshot_goto)." },
    { "snapshot_load_tmp", (PyCFunction)Node_snapshot_load_tmp, METH_VARARGS,
      "snapshot_load_tmp(id_or_name): show a snapshot on a read-only node." },
    { "compact", (PyCFunction)(void (*)(void))Node_compact,
      METH_VARARGS | METH_KEYWORDS,
      "compact(dry_run=False, progress=None) -> dict: compact the image in "
      "place (vd_compact); progress(percent) is called as it goes. "
      "Returns original_size, new_size, moved_clusters, cluster_size." },
    { "bitmap_add", (PyCFunction)(void (*)(void))Node_bitmap_add,
      METH_VARARGS | METH_KEYWORDS,
      "bitmap_add(name, granularity=0, persistent=False, disabled=False)." },
    { "bitmap_remove", (PyCFunction)Node_bitmap_remove, METH_VARARGS,
      "bitmap_remove(name)." },
    { "bitmap_clear", (PyCFunction)Node_bitmap_clear, METH_VARARGS,
      "bitmap_clear(name)." },
    { "bitmap_enable", (PyCFunction)Node_bitmap_enable, METH_VARARGS,
      "bitmap_enable(name)." },
    { "bitmap_disable", (PyCFunction)Node_bitmap_disable, METH_VARARGS,
      "bitmap_disable(name)." },
    { "bitmap_merge", (PyCFunction)(void (*)(void))Node_bitmap_merge,
      METH_VARARGS | METH_KEYWORDS,
      "bitmap_merge(target, sources): sources are names or (Node, name)." },
    { "bitmap_list", (PyCFunction)Node_bitmap_list, METH_NOARGS,
      "bitmap_list() -> list of dict, newest first." },
    { "bitmap_info", (PyCFunction)Node_bitmap_info, METH_VARARGS,
      "bitmap_info(name) -> dict." },
    { "bitmap_dirty", (PyCFunction)(void (*)(void))Node_bitmap_dirty,
      METH_VARARGS | METH_KEYWORDS,
      "bitmap_dirty(name, offset=0) -> list of (start, length)." },
    { "bitmap_sha256", (PyCFunction)Node_bitmap_sha256, METH_VARARGS,
      "bitmap_sha256(name) -> str." },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Node_getset[] = {
    { "size", (getter)Node_get_size, NULL, "virtual size in bytes", NULL },
    { "name", (getter)Node_get_name, NULL, "unique node name", NULL },
    { "format", (getter)Node_get_format, NULL, "driver name", NULL },
    { "filename", (getter)Node_get_filename, NULL, "file name", NULL },
    { "read_only", (getter)Node_get_read_only, NULL, "opened read-only",
      NULL },
    { "closed", (getter)Node_get_closed, NULL, "close() was called", NULL },
    { "backing", (getter)Node_get_backing, NULL,
      "the backing node (borrowed) or None", NULL },
    { "bitmap_default_granularity",
      (getter)Node_get_bitmap_default_granularity, NULL,
      "vd_bitmap_default_granularity()", NULL },
    { "bitmap_supports_persistent",
      (getter)Node_get_bitmap_supports_persistent, NULL,
      "vd_bitmap_supports_persistent()", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject NodeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vdisk.Node",
    .tp_basicsize = sizeof(NodeObject),
    .tp_dealloc = (destructor)Node_dealloc,
    .tp_repr = (reprfunc)Node_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open image (vdisk.open()) or a node of its graph.",
    .tp_methods = Node_methods,
    .tp_getset = Node_getset,
};

/* ---- Job ------------------------------------------------------------- */

#define JOB_MAX_NODES 4

struct JobObject {
    PyObject_HEAD
    vd_job *job;
    NodeObject *nodes[JOB_MAX_NODES];   /* kept alive while the job is */
    int nnodes;
    PyObject *progress;                 /* default callback of wait() */
};

static int job_status(JobObject *j)
{
    vd_job_info info;
    if (vd_job_get_info(j->job, &info) < 0)
        return -1;
    int st = info.status;
    vd_job_info_clear(&info);
    return st;
}

static int job_is_over(JobObject *j)
{
    int st = job_status(j);
    return st == VD_JOB_STATUS_CONCLUDED || st == VD_JOB_STATUS_NULL;
}

static void job_forget_nodes(JobObject *j)
{
    for (int i = 0; i < j->nnodes; i++) {
        NodeObject *root = root_of(j->nodes[i]);
        for (size_t k = 0; k < root->njobs; k++) {
            if (root->jobs[k] == j) {
                root->jobs[k] = root->jobs[--root->njobs];
                break;
            }
        }
        Py_CLEAR(j->nodes[i]);
    }
    j->nnodes = 0;
}

/* The progress callback may refer to its Job (a closure, a bound method
 * of an object holding the Job): the collector sees that edge. */
static int Job_traverse(JobObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->progress);
    return 0;
}

static int Job_clear(JobObject *self)
{
    Py_CLEAR(self->progress);
    return 0;
}

static void Job_dealloc(JobObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->job && !job_is_over(self)) {
        /* Nobody can reach the job any more: end it rather than leave a
         * thread working on nodes Python is about to close. */
        vd_job *job = self->job;
        Py_BEGIN_ALLOW_THREADS
        vd_job_cancel(job, true, NULL);
        vd_job_wait(job, NULL);
        Py_END_ALLOW_THREADS
    }
    job_forget_nodes(self);
    if (self->job)
        vd_job_unref(&self->job);
    Py_XDECREF(self->progress);
    PyObject_GC_Del(self);
}

/* A Job for the job just started in @job, holding @nodes. */
static PyObject *job_new(vd_job *job, NodeObject **nodes, int n,
                         PyObject *progress)
{
    JobObject *j = PyObject_GC_New(JobObject, &JobType);
    if (!j) {
        vd_job_cancel(job, true, NULL);
        vd_job_wait(job, NULL);
        vd_job_unref(&job);
        return NULL;
    }
    j->job = job;
    j->nnodes = 0;
    j->progress = progress && progress != Py_None ? Py_NewRef(progress)
                                                  : NULL;
    for (int i = 0; i < n; i++) {
        if (!nodes[i])
            continue;
        NodeObject *root = root_of(nodes[i]);
        JobObject **grown = PyMem_Realloc(root->jobs, (root->njobs + 1) *
                                          sizeof(*grown));
        if (!grown) {
            Py_DECREF(j);
            return PyErr_NoMemory();
        }
        root->jobs = grown;
        root->jobs[root->njobs++] = j;
        j->nodes[j->nnodes++] = (NodeObject *)Py_NewRef((PyObject *)nodes[i]);
    }
    PyObject_GC_Track(j);
    return (PyObject *)j;
}

static PyObject *job_info_dict(const vd_job_info *i)
{
    return Py_BuildValue("{s:N,s:s,s:s,s:K,s:K,s:L,s:O,s:O,s:O,s:s,s:N}",
        "id", str_of(i->id ? i->id : ""),
        "type", vd_job_type_name(i->type),
        "status", vd_job_status_name(i->status),
        "current_progress", (unsigned long long)i->current_progress,
        "total_progress", (unsigned long long)i->total_progress,
        "speed", (long long)i->speed,
        "busy", i->busy ? Py_True : Py_False,
        "paused", i->paused ? Py_True : Py_False,
        "ready", i->ready ? Py_True : Py_False,
        "io_status", vd_io_status_name(i->io_status),
        "error", i->error ? str_of(i->error) : Py_NewRef(Py_None));
}

static PyObject *Job_info(JobObject *self, PyObject *unused)
{
    (void)unused;
    vd_job_info info;
    int ret = vd_job_get_info(self->job, &info);
    if (ret < 0)
        return raise_error(ret, NULL);
    PyObject *d = job_info_dict(&info);
    vd_job_info_clear(&info);
    return d;
}

static PyObject *Job_get_id(JobObject *self, void *closure)
{
    (void)closure;
    return str_of(vd_job_id(self->job));
}

static PyObject *Job_get_status(JobObject *self, void *closure)
{
    (void)closure;
    int st = job_status(self);
    if (st < 0)
        return PyErr_NoMemory();
    return PyUnicode_FromString(vd_job_status_name((vd_job_status)st));
}

static PyObject *Job_get_progress(JobObject *self, void *closure)
{
    (void)closure;
    vd_job_info info;
    int ret = vd_job_get_info(self->job, &info);
    if (ret < 0)
        return raise_error(ret, NULL);
    PyObject *t = Py_BuildValue("(KK)",
                                (unsigned long long)info.current_progress,
                                (unsigned long long)info.total_progress);
    vd_job_info_clear(&info);
    return t;
}

/*
 * Polls the job until its status is one of @stop (a bit per
 * vd_job_status) or it concluded, calling @progress(current, total) in
 * this thread whenever the figures changed, sleeping @interval seconds
 * without the GIL between looks. Ctrl-C (a pending signal) ends the wait
 * with KeyboardInterrupt; the job goes on. Returns the status, or -1
 * with an exception.
 */
static int job_poll(JobObject *self, PyObject *progress, double interval,
                    unsigned stop, double timeout)
{
    uint64_t last_cur = UINT64_MAX, last_tot = UINT64_MAX;
    double waited = 0;
    for (;;) {
        vd_job_info info;
        int ret = vd_job_get_info(self->job, &info);
        if (ret < 0) {
            raise_error(ret, NULL);
            return -1;
        }
        int st = info.status;
        uint64_t cur = info.current_progress, tot = info.total_progress;
        vd_job_info_clear(&info);
        if (progress && (cur != last_cur || tot != last_tot)) {
            last_cur = cur;
            last_tot = tot;
            PyObject *r = PyObject_CallFunction(progress, "KK",
                                                (unsigned long long)cur,
                                                (unsigned long long)tot);
            if (!r)
                return -1;
            Py_DECREF(r);
        }
        if ((stop & (1u << st)) || st == VD_JOB_STATUS_CONCLUDED ||
            st == VD_JOB_STATUS_NULL)
            return st;
        if (timeout >= 0 && waited >= timeout) {
            PyErr_SetString(PyExc_TimeoutError, "the job did not reach the "
                            "state in time");
            return -1;
        }
        struct timespec ts = { (time_t)interval,
                               (long)((interval - (time_t)interval) * 1e9) };
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
        waited += interval;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static int parse_interval(double interval)
{
    if (!(interval > 0 && interval <= 60)) {
        PyErr_SetString(PyExc_ValueError, "interval must be in (0, 60]");
        return -1;
    }
    return 0;
}

/* wait(progress=None, interval=0.05): until the job concludes; raises
 * vdisk.Error with its error (ECANCELED when cancelled). */
static PyObject *Job_wait(JobObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "progress", "interval", NULL };
    PyObject *progress = Py_None;
    double interval = 0.05;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Od:wait", kwl, &progress,
                                     &interval) ||
        parse_interval(interval) < 0)
        return NULL;
    if (progress == Py_None)
        progress = self->progress;
    if (job_poll(self, progress, interval, 0, -1) < 0)
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_job *job = self->job;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_job_wait(job, &err);
    Py_END_ALLOW_THREADS
    if (progress) {
        /* The last figures, once the job is over. */
        vd_job_info info;
        if (vd_job_get_info(job, &info) == 0) {
            PyObject *r = PyObject_CallFunction(progress, "KK",
                (unsigned long long)info.current_progress,
                (unsigned long long)info.total_progress);
            vd_job_info_clear(&info);
            if (!r)
                return NULL;
            Py_DECREF(r);
        }
    }
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

/* wait_ready(progress=None, interval=0.05, timeout=None): until the job
 * is READY (a mirror, an active commit); vdisk.Error if it concluded
 * instead. */
static PyObject *Job_wait_ready(JobObject *self, PyObject *args,
                                PyObject *kw)
{
    static char *kwl[] = { "progress", "interval", "timeout", NULL };
    PyObject *progress = Py_None, *timeout_o = Py_None;
    double interval = 0.05, timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OdO:wait_ready", kwl,
                                     &progress, &interval, &timeout_o) ||
        parse_interval(interval) < 0)
        return NULL;
    if (timeout_o != Py_None) {
        timeout = PyFloat_AsDouble(timeout_o);
        if (timeout == -1 && PyErr_Occurred())
            return NULL;
        if (timeout < 0)
            timeout = 0;
    }
    if (progress == Py_None)
        progress = self->progress;
    int st = job_poll(self, progress, interval,
                      1u << VD_JOB_STATUS_READY, timeout);
    if (st < 0)
        return NULL;
    if (st != VD_JOB_STATUS_READY) {
        vd_error err = VD_ERROR_INIT;
        vd_job *job = self->job;
        int ret;
        Py_BEGIN_ALLOW_THREADS
        ret = vd_job_wait(job, &err);
        Py_END_ALLOW_THREADS
        if (ret < 0)
            return raise_error(ret, &err);
        return raise_msg(EINVAL, "the job concluded without becoming ready");
    }
    Py_RETURN_NONE;
}

/* The verbs: each a C call that may wait a little (pause points). */
static PyObject *job_verb(JobObject *self, int (*fn)(vd_job *, vd_error *))
{
    vd_error err = VD_ERROR_INIT;
    vd_job *job = self->job;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = fn(job, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

static PyObject *Job_cancel(JobObject *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = { "force", NULL };
    int force = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:cancel", kwl, &force))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_job *job = self->job;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_job_cancel(job, force, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

static PyObject *Job_complete(JobObject *self, PyObject *unused)
{
    (void)unused;
    return job_verb(self, vd_job_complete);
}

static PyObject *Job_pause(JobObject *self, PyObject *unused)
{
    (void)unused;
    return job_verb(self, vd_job_pause);
}

static PyObject *Job_resume(JobObject *self, PyObject *unused)
{
    (void)unused;
    return job_verb(self, vd_job_resume);
}

static PyObject *Job_set_speed(JobObject *self, PyObject *args)
{
    long long speed;
    if (!PyArg_ParseTuple(args, "L:set_speed", &speed))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    int ret = vd_job_set_speed(self->job, speed, &err);
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

static PyMethodDef Job_methods[] = {
    { "wait", (PyCFunction)(void (*)(void))Job_wait,
      METH_VARARGS | METH_KEYWORDS,
      "wait(progress=None, interval=0.05): until the job concludes "
      "(vd_job_wait); raises vdisk.Error on failure or cancel." },
    { "wait_ready", (PyCFunction)(void (*)(void))Job_wait_ready,
      METH_VARARGS | METH_KEYWORDS,
      "wait_ready(progress=None, interval=0.05, timeout=None): until READY." },
    { "cancel", (PyCFunction)(void (*)(void))Job_cancel,
      METH_VARARGS | METH_KEYWORDS, "cancel(force=False) (vd_job_cancel)." },
    { "complete", (PyCFunction)Job_complete, METH_NOARGS,
      "complete() (vd_job_complete)." },
    { "pause", (PyCFunction)Job_pause, METH_NOARGS, "pause()." },
    { "resume", (PyCFunction)Job_resume, METH_NOARGS, "resume()." },
    { "set_speed", (PyCFunction)Job_set_speed, METH_VARARGS,
      "set_speed(bytes_per_second) (vd_job_set_speed)." },
    { "info", (PyCFunction)Job_info, METH_NOARGS,
      "info() -> dict (vd_job_get_info)." },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Job_getset[] = {
    { "id", (getter)Job_get_id, NULL, "the job id", NULL },
    { "status", (getter)Job_get_status, NULL, "QEMU's status name", NULL },
    { "progress", (getter)Job_get_progress, NULL, "(current, total)", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject JobType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vdisk.Job",
    .tp_basicsize = sizeof(JobObject),
    .tp_dealloc = (destructor)Job_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Job_traverse,
    .tp_clear = (inquiry)Job_clear,
    .tp_doc = "A block job started by vdisk.stream/commit/mirror/backup().",
    .tp_methods = Job_methods,
    .tp_getset = Job_getset,
};

/* ---- starting jobs ---------------------------------------------------- */

/* What every start function takes besides its own arguments. */
typedef struct {
    long long speed;
    const char *on_error, *on_target_error;
    PyObject *progress;
} common_args;

static int fill_job_options(vd_job_options *o, const char *id,
                            const common_args *c)
{
    memset(o, 0, sizeof(*o));
    o->id = id;
    o->speed = c->speed;
    vd_on_error e;
    if (c->on_error && vd_on_error_parse(c->on_error, &e) < 0) {
        PyErr_Format(PyExc_ValueError, "unknown on_error '%s'", c->on_error);
        return -1;
    }
    o->on_error = c->on_error ? e : VD_ON_ERROR_REPORT;
    if (c->on_target_error &&
        vd_on_error_parse(c->on_target_error, &e) < 0) {
        PyErr_Format(PyExc_ValueError, "unknown on_target_error '%s'",
                     c->on_target_error);
        return -1;
    }
    o->on_target_error = c->on_target_error ? e : VD_ON_ERROR_REPORT;
    if (c->progress != Py_None && !PyCallable_Check(c->progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable");
        return -1;
    }
    return 0;
}

/* A Node argument, or None when @allow_none. */
static int conv_node(PyObject *o, void *out)
{
    if (!PyObject_TypeCheck(o, &NodeType)) {
        PyErr_Format(PyExc_TypeError, "a vdisk.Node is required, not %s",
                     Py_TYPE(o)->tp_name);
        return 0;
    }
    *(NodeObject **)out = (NodeObject *)o;
    return 1;
}

static int conv_opt_node(PyObject *o, void *out)
{
    if (o == Py_None) {
        *(NodeObject **)out = NULL;
        return 1;
    }
    return conv_node(o, out);
}

/* Resolves the Nodes @in[0..n) (NULL entries stay NULL). */
static int resolve_nodes(NodeObject **in, vd_node **out, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = NULL;
        if (in[i] && !(out[i] = node_get(in[i])))
            return -1;
    }
    return 0;
}

static const char *const sync_names[] = { "full", "top", "none",
                                          "incremental", "bitmap", NULL };
static const char *const bitmap_mode_names[] = { "", "on-success", "never",
                                                 "always", NULL };

static int lookup(const char *const *names, const char *s, int from,
                  const char *what)
{
    for (int i = from; names[i]; i++)
        if (!strcmp(names[i], s))
            return i;
    PyErr_Format(PyExc_ValueError, "unknown %s '%s'", what, s);
    return -1;
}

#define COMMON_KW "speed", "on_error", "on_target_error", "progress"
#define COMMON_FMT "Lzz" "O"
#define COMMON_REF(c) &(c).speed, &(c).on_error, &(c).on_target_error, \
                      &(c).progress

/* stream(job_id, top, base=None, backing_file=None, ...) */
static PyObject *mod_stream(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "job_id", "top", "base", "backing_file",
                           COMMON_KW, NULL };
    const char *id, *backing_file = NULL;
    NodeObject *nodes[2] = { NULL, NULL };
    common_args c = { 0, NULL, NULL, Py_None };
    vd_job_options o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO&|O&z$" COMMON_FMT
                                     ":stream", kwl, &id, conv_node,
                                     &nodes[0], conv_opt_node, &nodes[1],
                                     &backing_file, COMMON_REF(c)) ||
        fill_job_options(&o, id, &c) < 0)
        return NULL;
    vd_node *vn[2];
    if (resolve_nodes(nodes, vn, 2) < 0)
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_stream_start(&job, vn[0], vn[1], backing_file, false, &o, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    return job_new(job, nodes, 2, c.progress);
}

/* commit(job_id, active, top=None, base=None, backing_file=None, ...) */
static PyObject *mod_commit(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "job_id", "active", "top", "base", "backing_file",
                           COMMON_KW, NULL };
    const char *id, *backing_file = NULL;
    NodeObject *nodes[3] = { NULL, NULL, NULL };
    common_args c = { 0, NULL, NULL, Py_None };
    vd_job_options o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO&|O&O&z$" COMMON_FMT
                                     ":commit", kwl, &id, conv_node,
                                     &nodes[0], conv_opt_node, &nodes[1],
                                     conv_opt_node, &nodes[2], &backing_file,
                                     COMMON_REF(c)) ||
        fill_job_options(&o, id, &c) < 0)
        return NULL;
    vd_node *vn[3];
    if (resolve_nodes(nodes, vn, 3) < 0)
        return NULL;
    if (!vn[1])
        vn[1] = vn[0];          /* top defaults to the active layer */
    if (!vn[2]) {
        vn[2] = vd_node_child(vn[1], "backing");
        if (!vn[2])
            return raise_msg(EINVAL, "the top node has no backing node to "
                             "commit into");
    }
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_commit_start(&job, vn[0], vn[1], vn[2], backing_file, false, &o,
                          &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    return job_new(job, nodes, 3, c.progress);
}

/* mirror(job_id, source, target, sync="full", granularity=0, buf_size=0,
 *        target_is_zero=False, write_blocking=False, no_unmap=False, ...) */
static PyObject *mod_mirror(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "job_id", "source", "target", "sync",
                           "granularity", "buf_size", "target_is_zero",
                           "write_blocking", "no_unmap", COMMON_KW, NULL };
    const char *id, *sync = "full";
    NodeObject *nodes[2] = { NULL, NULL };
    uint64_t gran = 0, buf_size = 0;
    int tz = 0, wb = 0, no_unmap = 0;
    common_args c = { 0, NULL, NULL, Py_None };
    vd_job_options o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO&O&|$sO&O&ppp" COMMON_FMT
                                     ":mirror", kwl, &id, conv_node,
                                     &nodes[0], conv_node, &nodes[1], &sync,
                                     conv_u64, &gran, conv_u64, &buf_size,
                                     &tz, &wb, &no_unmap, COMMON_REF(c)) ||
        fill_job_options(&o, id, &c) < 0)
        return NULL;
    int s = lookup(sync_names, sync, 0, "sync mode");
    if (s < 0)
        return NULL;
    if (s > VD_MIRROR_SYNC_NONE) {
        PyErr_Format(PyExc_ValueError, "a mirror's sync is full, top or "
                     "none, not '%s'", sync);
        return NULL;
    }
    vd_node *vn[2];
    if (resolve_nodes(nodes, vn, 2) < 0)
        return NULL;
    vd_mirror_options mo = { .sync = (vd_mirror_sync)s, .granularity = gran,
                             .buf_size = (int64_t)buf_size,
                             .no_unmap = no_unmap, .target_is_zero = tz,
                             .write_blocking = wb };
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_mirror_start(&job, vn[0], vn[1], &mo, &o, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    return job_new(job, nodes, 2, c.progress);
}

/* backup(job_id, source, target, sync="full", compress=False, bitmap=None,
 *        bitmap_mode=None, ...) */
static PyObject *mod_backup(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "job_id", "source", "target", "sync", "compress",
                           "bitmap", "bitmap_mode", COMMON_KW, NULL };
    const char *id, *sync = "full", *bitmap = NULL, *mode = NULL;
    NodeObject *nodes[2] = { NULL, NULL };
    int compress = 0;
    common_args c = { 0, NULL, NULL, Py_None };
    vd_job_options o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO&O&|$spzz" COMMON_FMT
                                     ":backup", kwl, &id, conv_node,
                                     &nodes[0], conv_node, &nodes[1], &sync,
                                     &compress, &bitmap, &mode,
                                     COMMON_REF(c)) ||
        fill_job_options(&o, id, &c) < 0)
        return NULL;
    int s = lookup(sync_names, sync, 0, "sync mode");
    int bm = mode ? lookup(bitmap_mode_names, mode, 1, "bitmap mode") : 0;
    if (s < 0 || bm < 0)
        return NULL;
    vd_node *vn[2];
    if (resolve_nodes(nodes, vn, 2) < 0)
        return NULL;
    vd_backup_options bo = { .sync = (vd_backup_sync)s, .compress = compress,
                             .bitmap = bitmap,
                             .bitmap_mode = (vd_bitmap_sync_mode)bm };
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = vd_backup_start_opts(&job, vn[0], vn[1], &bo, &o, &err);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return raise_error(ret, &err);
    return job_new(job, nodes, 2, c.progress);
}

/* ---- module functions ------------------------------------------------ */

/* open(filename, options=None, read_only=True, fmt=None, *,
 *      no_backing=False, force_share=False, no_user=False, resize=False,
 *      no_bitmaps=False) -> Node */
static PyObject *mod_open(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "filename", "options", "read_only", "fmt",
                           "no_backing", "force_share", "no_user", "resize",
                           "no_bitmaps", NULL };
    PyObject *fname = NULL, *options = Py_None;
    int read_only = 1, no_backing = 0, force_share = 0, no_user = 0;
    int resize = 0, no_bitmaps = 0;
    const char *fmt = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|Opz$ppppp:open", kwl,
                                     conv_opt_path, &fname, &options,
                                     &read_only, &fmt, &no_backing,
                                     &force_share, &no_user, &resize,
                                     &no_bitmaps))
        return NULL;
    vd_opts *o = opts_from(options);
    if (!o) {
        Py_XDECREF(fname);
        return NULL;
    }
    unsigned flags = (read_only ? 0 : VD_O_RDWR) |
                     (no_backing ? VD_O_NO_BACKING : 0) |
                     (force_share ? VD_O_FORCE_SHARE : 0) |
                     (no_user ? VD_O_NO_USER : 0) |
                     (resize ? VD_O_RESIZE : 0) |
                     (no_bitmaps ? VD_O_NO_BITMAPS : 0);
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    int ret;
    const char *f = cstr(fname);
    Py_BEGIN_ALLOW_THREADS
    ret = vd_open(&n, f, fmt, o, flags, &err);
    Py_END_ALLOW_THREADS
    vd_opts_free(&o);
    Py_XDECREF(fname);
    if (ret < 0)
        return raise_error(ret, &err);
    NodeObject *self = PyObject_New(NodeObject, &NodeType);
    if (!self) {
        vd_close(&n, NULL);
        return NULL;
    }
    self->node = n;
    self->owner = NULL;
    self->name = NULL;
    self->inflight = 0;
    self->exclusive = 0;
    self->jobs = NULL;
    self->njobs = 0;
    return (PyObject *)self;
}

/* create(filename, fmt, size=None, options=None) */
static PyObject *mod_create(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwl[] = { "filename", "fmt", "size", "options", NULL };
    PyObject *fname = NULL, *size = Py_None, *options = Py_None;
    const char *fmt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&s|OO:create", kwl,
                                     conv_opt_path, &fname, &fmt, &size,
                                     &options))
        return NULL;
    if (!fname) {
        PyErr_SetString(PyExc_TypeError, "create() needs a filename");
        return NULL;
    }
    vd_opts *o = opts_from(options);
    if (!o) {
        Py_DECREF(fname);
        return NULL;
    }
    if (size != Py_None) {
        uint64_t sz;
        char text[32];
        if (!conv_u64(size, &sz)) {
            vd_opts_free(&o);
            Py_DECREF(fname);
            return NULL;
        }
        snprintf(text, sizeof(text), "%llu", (unsigned long long)sz);
        vd_opts_set(o, "size", text);
    }
    vd_error err = VD_ERROR_INIT;
    int ret;
    const char *f = cstr(fname);
    Py_BEGIN_ALLOW_THREADS
    ret = vd_create(f, fmt, o, &err);
    Py_END_ALLOW_THREADS
    vd_opts_free(&o);
    Py_DECREF(fname);
    if (ret < 0)
        return raise_error(ret, &err);
    Py_RETURN_NONE;
}

static PyObject *mod_version(PyObject *m, PyObject *unused)
{
    (void)m;
    (void)unused;
    return PyUnicode_FromString(vd_version());
}

static PyMethodDef mod_methods[] = {
    { "open", (PyCFunction)(void (*)(void))mod_open,
      METH_VARARGS | METH_KEYWORDS,
      "open(filename, options=None, read_only=True, fmt=None, *, "
      "no_backing=False, force_share=False, no_user=False, resize=False, "
      "no_bitmaps=False) -> Node (no_bitmaps: leave persistent dirty "
      "bitmaps on disk, as compact needs)" },
    { "create", (PyCFunction)(void (*)(void))mod_create,
      METH_VARARGS | METH_KEYWORDS,
      "create(filename, fmt, size=None, options=None) (vd_create)" },
    { "version", mod_version, METH_NOARGS, "the library version" },
    { "stream", (PyCFunction)(void (*)(void))mod_stream,
      METH_VARARGS | METH_KEYWORDS,
      "stream(job_id, top, base=None, backing_file=None, *, speed=0, "
      "on_error=None, on_target_error=None, progress=None) -> Job" },
    { "commit", (PyCFunction)(void (*)(void))mod_commit,
      METH_VARARGS | METH_KEYWORDS,
      "commit(job_id, active, top=None, base=None, backing_file=None, "
      "*, ...) -> Job" },
    { "mirror", (PyCFunction)(void (*)(void))mod_mirror,
      METH_VARARGS | METH_KEYWORDS,
      "mirror(job_id, source, target, *, sync='full', granularity=0, "
      "buf_size=0, target_is_zero=False, write_blocking=False, "
      "no_unmap=False, ...) -> Job" },
    { "backup", (PyCFunction)(void (*)(void))mod_backup,
      METH_VARARGS | METH_KEYWORDS,
      "backup(job_id, source, target, *, sync='full', compress=False, "
      "bitmap=None, bitmap_mode=None, ...) -> Job" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef vdisk_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vdisk",
    .m_doc = "Python bindings of libvdisk, a block layer for VM disk images "
             "(docs/python.md).",
    .m_size = -1,
    .m_methods = mod_methods,
};

PyMODINIT_FUNC PyInit_vdisk(void)
{
    if (PyType_Ready(&NodeType) < 0 || PyType_Ready(&JobType) < 0 ||
        PyType_Ready(&BlockStatusIterType) < 0)
        return NULL;
    if (!ExtentType.tp_name &&
        PyStructSequence_InitType2(&ExtentType, &extent_desc) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&vdisk_module);
    if (!m)
        return NULL;
    VdiskError = PyErr_NewExceptionWithDoc("vdisk.Error",
        "An error of libvdisk: an OSError whose errno is the C call's "
        "errno, with .message (the library's one-line message) and .hint "
        "(its hint line or None).", PyExc_OSError, NULL);
    if (!VdiskError)
        goto fail;
    if (PyModule_AddObjectRef(m, "Error", VdiskError) < 0 ||
        PyModule_AddObjectRef(m, "Node", (PyObject *)&NodeType) < 0 ||
        PyModule_AddObjectRef(m, "Job", (PyObject *)&JobType) < 0 ||
        PyModule_AddObjectRef(m, "Extent", (PyObject *)&ExtentType) < 0 ||
        PyModule_AddStringConstant(m, "__version__", vd_version()) < 0)
        goto fail;
    static const struct { const char *name; long value; } consts[] = {
        { "BLOCK_DATA", VD_BLOCK_DATA },
        { "BLOCK_ZERO", VD_BLOCK_ZERO },
        { "BLOCK_OFFSET_VALID", VD_BLOCK_OFFSET_VALID },
        { "BLOCK_ALLOCATED", VD_BLOCK_ALLOCATED },
        { "BLOCK_EOF", VD_BLOCK_EOF },
        { "BLOCK_COMPRESSED", VD_BLOCK_COMPRESSED },
    };
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
