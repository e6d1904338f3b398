/* kvd.native._copy: bulk copies of many byte runs, with the GIL released.
 *
 * Built by `pip install` (setuptools, optional: kvd.native.copy falls back to numpy when this
 * module is missing). Three calls, each checking every run against its buffers before any
 * byte moves (ValueError otherwise):
 *
 *   copy_runs(dst, dst_offsets, src, src_offsets, lengths)
 *       dst[dst_offsets[i] : + lengths[i]] = src[src_offsets[i] : + lengths[i]]
 *   scatter(dst, offsets, srcs)   dst[offsets[i] : + len(srcs[i])] = srcs[i]
 *   gather(src, offsets, dsts)    dsts[i][:] = src[offsets[i] : + len(dsts[i])]
 *
 * Offsets and lengths are sequences of ints (bytes). Runs adjacent in both buffers are
 * copied as one. Why a compiled helper (docs/decisions.md, "Data path at the machine's
 * limit"): a copy below glibc's non-temporal threshold (about 100 MiB here) goes through
 * the cache and reads each destination line before writing it, at ~60% of a bulk copy's
 * rate; this one streams runs of STREAM_MIN bytes or more with non-temporal stores, two
 * pages at a time (as glibc's large copies do), when the call moves STREAM_CALL_MIN bytes
 * or more. Smaller calls (data an engine reads next, still in cache) use memcpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KVD_X86 1
#endif

#define STREAM_MIN 4096
#define STREAM_CALL_MIN (1 << 20)
#define PAGE 4096

typedef void (*copy_fn)(char *, const char *, size_t);

static void copy_plain(char *dst, const char *src, size_t n) { memcpy(dst, src, n); }

#ifdef KVD_X86
/* Non-temporal copy with vectors of W bytes: the head up to a W-byte boundary by memcpy,
 * then two pages of the source at once (4 vectors from each per step, the next lines
 * prefetched, as glibc's large copies do), the tail by memcpy. */
#define STREAM_COPY(NAME, TARGET, VEC, W, LOAD, STORE)                                    \
    __attribute__((target(TARGET))) static void NAME(char *dst, const char *src, size_t n) { \
        size_t head = (W - ((uintptr_t)dst & (W - 1))) & (W - 1);                          \
        if (head > n) head = n;                                                            \
        memcpy(dst, src, head);                                                            \
        dst += head, src += head, n -= head;                                               \
        size_t pairs = n / (2 * PAGE);                                                     \
        for (size_t k = 0; k < pairs; k++) {                                               \
            const char *s = src + k * 2 * PAGE;                                            \
            char *d = dst + k * 2 * PAGE;                                                  \
            for (size_t i = 0; i < PAGE; i += 4 * W) {                                     \
                for (int j = 0; j < 4 * W; j += 64) {                                      \
                    _mm_prefetch(s + i + 4 * W + j, _MM_HINT_T0);                          \
                    _mm_prefetch(s + PAGE + i + 4 * W + j, _MM_HINT_T0);                   \
                }                                                                          \
                VEC a[4], b[4];                                                            \
                for (int v = 0; v < 4; v++) a[v] = LOAD((const void *)(s + i + v * W));    \
                for (int v = 0; v < 4; v++) b[v] = LOAD((const void *)(s + PAGE + i + v * W)); \
                for (int v = 0; v < 4; v++) STORE((void *)(d + i + v * W), a[v]);          \
                for (int v = 0; v < 4; v++) STORE((void *)(d + PAGE + i + v * W), b[v]);   \
            }                                                                              \
        }                                                                                  \
        size_t done = pairs * 2 * PAGE;                                                    \
        memcpy(dst + done, src + done, n - done);                                          \
    }

static inline __attribute__((target("avx2"))) __m256i load256(const void *p) { return _mm256_loadu_si256(p); }
static inline __attribute__((target("avx2"))) void store256(void *p, __m256i v) { _mm256_stream_si256(p, v); }
STREAM_COPY(copy_stream512, "avx512f", __m512i, 64, _mm512_loadu_si512, _mm512_stream_si512)
STREAM_COPY(copy_stream256, "avx2", __m256i, 32, load256, store256)
#endif

static copy_fn stream_copy = copy_plain; /* chosen once, at import */
static const char *stream_name = "memcpy";

typedef struct {
    char *dst;
    const char *src;
    size_t n;
} run_t;

/* Copy the runs (GIL released), joining those adjacent in both buffers. */
static void copy_all(run_t *runs, Py_ssize_t count) {
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) total += runs[i].n;
    int stream = total >= STREAM_CALL_MIN && stream_copy != copy_plain;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < count) {
        char *d = runs[i].dst;
        const char *s = runs[i].src;
        size_t n = runs[i].n;
        for (i++; i < count && runs[i].dst == d + n && runs[i].src == s + n; i++) n += runs[i].n;
        if (stream && n >= STREAM_MIN)
            stream_copy(d, s, n);
        else
            memcpy(d, s, n);
    }
#ifdef KVD_X86
    if (stream) _mm_sfence(); /* the streamed stores are visible before the call returns */
#endif
    Py_END_ALLOW_THREADS
}

/* The ints of a contiguous buffer of signed 64-bit ints (a numpy int64 array), or NULL
 * with no exception when ``obj`` is not one (the caller reads it as a sequence then). */
static Py_ssize_t *int64_buffer(PyObject *obj, Py_ssize_t want, const char *what, int *failed) {
    *failed = 0;
    if (sizeof(Py_ssize_t) != 8 || PyList_Check(obj) || PyTuple_Check(obj) || !PyObject_CheckBuffer(obj)) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return NULL;
    }
    const char *f = b.format ? b.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    Py_ssize_t *out = NULL;
    if (b.itemsize == 8 && (*f == 'q' || *f == 'l') && f[1] == '\0') {
        Py_ssize_t n = b.len / 8;
        if (want >= 0 && n != want) {
            PyErr_Format(PyExc_ValueError, "%zd %s for %zd runs", n, what, want);
            *failed = 1;
        } else if ((out = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1))) == NULL) {
            PyErr_NoMemory();
            *failed = 1;
        } else {
            memcpy(out, b.buf, (size_t)b.len);
        }
    }
    PyBuffer_Release(&b);
    return out;
}

/* The ints of a sequence (offsets or lengths), or of an int64 array; NULL with an
 * exception set. */
static Py_ssize_t *int_array(PyObject *seq, Py_ssize_t want, const char *what) {
    int failed;
    Py_ssize_t *direct = int64_buffer(seq, want, what, &failed);
    if (direct != NULL || failed) return direct;
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (want >= 0 && n != want) {
        PyErr_Format(PyExc_ValueError, "%zd %s for %zd runs", n, what, want);
        Py_DECREF(fast);
        return NULL;
    }
    Py_ssize_t *out = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyNumber_AsSsize_t(items[i], PyExc_OverflowError);
        if (out[i] == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return out;
}

static int in_bounds(Py_ssize_t off, Py_ssize_t n, Py_ssize_t size, const char *what, Py_ssize_t i) {
    if (off < 0 || n < 0 || off > size || n > size - off) {
        PyErr_Format(PyExc_ValueError, "run %zd: [%zd, %zd) is outside the %zd-byte %s", i, off, off + n, size, what);
        return 0;
    }
    return 1;
}

static PyObject *copy_runs(PyObject *self, PyObject *args) {
    PyObject *dst_obj, *dst_offs_obj, *src_obj, *src_offs_obj, *lens_obj;
    if (!PyArg_ParseTuple(args, "OOOOO:copy_runs", &dst_obj, &dst_offs_obj, &src_obj, &src_offs_obj, &lens_obj))
        return NULL;
    Py_buffer dst, src;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t *lens = NULL, *doffs = NULL, *soffs = NULL;
    run_t *runs = NULL;
    Py_ssize_t n = PySequence_Size(lens_obj);
    if (n < 0) goto done;
    if (!(lens = int_array(lens_obj, n, "lengths")) || !(doffs = int_array(dst_offs_obj, n, "destination offsets")) ||
        !(soffs = int_array(src_offs_obj, n, "source offsets")))
        goto done;
    runs = PyMem_Malloc(sizeof(run_t) * (n ? n : 1));
    if (runs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!in_bounds(doffs[i], lens[i], dst.len, "destination", i) || !in_bounds(soffs[i], lens[i], src.len, "source", i))
            goto done;
        runs[i] = (run_t){(char *)dst.buf + doffs[i], (const char *)src.buf + soffs[i], (size_t)lens[i]};
    }
    copy_all(runs, n);
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(runs);
    PyMem_Free(lens);
    PyMem_Free(doffs);
    PyMem_Free(soffs);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

/* scatter (to_many 0): one buffer written from many; gather (1): many written from one. */
static PyObject *one_and_many(PyObject *args, int to_many, const char *fmt) {
    PyObject *one_obj, *offs_obj, *many_obj;
    if (!PyArg_ParseTuple(args, fmt, &one_obj, &offs_obj, &many_obj)) return NULL;
    Py_buffer one;
    if (PyObject_GetBuffer(one_obj, &one, (to_many ? 0 : PyBUF_WRITABLE) | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *result = NULL, *many = PySequence_Fast(many_obj, "buffers must be a sequence");
    Py_ssize_t *offs = NULL, held = 0, n = 0;
    Py_buffer *bufs = NULL;
    run_t *runs = NULL;
    if (many == NULL) goto done;
    n = PySequence_Fast_GET_SIZE(many);
    if (!(offs = int_array(offs_obj, n, "offsets"))) goto done;
    bufs = PyMem_Malloc(sizeof(Py_buffer) * (n ? n : 1));
    runs = PyMem_Malloc(sizeof(run_t) * (n ? n : 1));
    if (bufs == NULL || runs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject **items = PySequence_Fast_ITEMS(many);
    for (; held < n; held++) {
        int flags = (to_many ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(items[held], &bufs[held], flags) < 0) goto done;
        Py_buffer *b = &bufs[held];
        if (!in_bounds(offs[held], b->len, one.len, to_many ? "source" : "destination", held)) {
            held++;
            goto done;
        }
        char *at = (char *)one.buf + offs[held];
        runs[held] = to_many ? (run_t){(char *)b->buf, at, (size_t)b->len} : (run_t){at, (const char *)b->buf, (size_t)b->len};
    }
    copy_all(runs, n);
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(runs);
    PyMem_Free(offs);
    Py_XDECREF(many);
    PyBuffer_Release(&one);
    return result;
}

static PyObject *scatter(PyObject *self, PyObject *args) { return one_and_many(args, 0, "OOO:scatter"); }
static PyObject *gather(PyObject *self, PyObject *args) { return one_and_many(args, 1, "OOO:gather"); }

static PyMethodDef methods[] = {
    {"copy_runs", copy_runs, METH_VARARGS, "copy_runs(dst, dst_offsets, src, src_offsets, lengths)"},
    {"scatter", scatter, METH_VARARGS, "scatter(dst, offsets, srcs): dst[offsets[i]:] = srcs[i]"},
    {"gather", gather, METH_VARARGS, "gather(src, offsets, dsts): dsts[i][:] = src[offsets[i]:]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copy", "Bulk copies of byte runs (kvd.native.copy).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__copy(void) {
#ifdef KVD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        stream_copy = copy_stream512;
        stream_name = "avx512 non-temporal";
    } else if (__builtin_cpu_supports("avx2")) {
        stream_copy = copy_stream256;
        stream_name = "avx2 non-temporal";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "STREAM", stream_name) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_MIN", STREAM_MIN) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_CALL_MIN", STREAM_CALL_MIN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
