/* Optional C versions of the access log's per-request work (tunneld/speedups.py).

Theory of operation
-------------------
With the access log on, every small response used to cost ~48k instructions of the edge's
Python on top of relaying it (docs/performance.md, "Access log (issue 10)"): a regex that
validates the response head, joining the x-request-id line into it, formatting the text line,
and finding the client's X-Request-Id. Each function here does one of those in one call, with
exactly the result of its pure-Python reference (named in each docstring; the references stay
the fallback and are what tests/test_speedups.py compares these with, on arbitrary bytes):

- simple_head(data): responses.simple_head_py (``_SIMPLE_RE`` + status + length checks);
- whole_response(framer, data, request, now, kept): accesslog.whole_response_py;
- text_line(pending, stamp, sec, now, lead, request, site): accesslog.text_line_py;
- request_ids(headers, counter, prefix): accesslog.request_ids_py;
- begin_request(head, counter, prefix, now, requests, framer): accesslog.begin_request_py;
- log_response(state, conn, data): accesslog.log_response_py (whole_response, the request's
  end, the metrics' count, text_line and the writer's flush or timer, in one call);
- log_request(state, head): accesslog.log_request_py (begin_request from that state);
- tally(bounds): metrics.tally_py, a Tally: the metrics of whole responses, counted as they
  come (``whole_response`` counts into it without a Python call);
- id_counter(start): itertools.count(start), the request ids' counter, whose values make_ids
  takes in C;
- pending() and spill(state): a connection's one request in flight held out of its deque by
  log_request and log_response (the state's last item), and moved back to the deque and the
  framer before the Python code looks (accesslog.spill_py does nothing: the reference holds
  none). See "The request in flight of a keep-alive connection" below.

log_response holds the common case's numbers in C (whole_native: the clocks, the request's
start and body_in, its duration, status and sizes), so no int object is made or read back for
them; anything else (an int subclass, one past 64 bits) goes the general way, through
whole_response and text_line on the objects, with the same results.

The bytes come from services, agents and clients, none of them trusted: every read is
bounds-checked against the buffer's length, output sizes are computed (with overflow checks)
before one allocation, and no stack buffer holds input (the only one holds a formatted 64-bit
number). Plain C API, no Cython; built by setup.py as an optional extension.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX */
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Code for what is rare goes out of the common path's lines, and code used several times per
   request is one copy, not inlined at each use: an instruction cache line fetched per request
   costs more than the instructions it holds (docs/performance.md). */
#if defined(__GNUC__)
#define COLD __attribute__((noinline, cold))
#define NOINLINE __attribute__((noinline))
#else
#define COLD
#define NOINLINE
#endif

/* RFC 9110 tchar: ! # $ % & ' * + - . ^ _ ` | ~ DIGIT ALPHA */
static unsigned char is_token[256];
/* request ids a client may choose: A-Z a-z 0-9 . _ : - (accesslog._VALID_ID) */
static unsigned char is_id_char[256];

#define MAX_CLIENT_ID 200
#define MAX_LENGTH_DIGITS 18 /* below 10**18: fits in int64 */

static PyObject *str_state;   /* "_state" */
static PyObject *str_buf;     /* "_buf" */
static PyObject *str_methods; /* "_methods" */
static PyObject *str_popleft; /* "popleft" */
static PyObject *bytes_head;  /* b"HEAD" */
static PyObject *bytes_xrid;  /* b"x-request-id" */
static PyObject *bytes_hex16; /* b"%016x" */
static PyObject *int_zero;    /* 0, ResponseFramer's _HEAD */
static PyObject *float_1e9;   /* 1e9: ns / 1e9 is seconds */
static PyObject *int_raw;     /* 4, ResponseFramer's _RAW (unframed) */
static PyObject *str_headers, *str_method, *str_target, *str_append;
static PyObject *str_is_enabled_for, *str_sandbox_id, *str_port, *str_resite;
static PyObject *str_restamp, *str_flush, *str_arm, *int_info, *int_1e9, *str_disabled;
static PyObject *str_cache; /* "_cache" */
static PyObject *time_monotonic_ns, *time_time_ns; /* time.monotonic_ns, time.time_ns */

static const char XRID_PREFIX[] = "x-request-id: ";
#define XRID_PREFIX_LEN (sizeof(XRID_PREFIX) - 1)

/* Reading an attribute that a class's __slots__ holds, without looking it up each time: what
   PyObject_GetAttr finds for such a name is the member descriptor of the slot (a data
   descriptor, so no instance dict can shadow it), and what that returns is the object at its
   offset. The offset is kept per (type, name) with the type's version tag, which CPython changes
   (and never reuses) whenever the type or a base changes (the method cache relies on it). The
   direct read is used only for an instance of exactly that type, with the generic getattr, the
   tag still the same and the slot set; anything else goes through PyObject_GetAttr (an unset
   slot's AttributeError, a subclass, a changed class). tests/test_speedups.py compares every
   function with its Python reference, odd objects included, and checks a changed class. */
typedef struct {
    PyObject *name;         /* interned attribute name */
    PyTypeObject *type;     /* strong reference; NULL: nothing cached */
    unsigned int version;   /* type->tp_version_tag when cached */
    Py_ssize_t offset;      /* the slot's offset in an instance */
} slot_cache;

static void
cache_slot(PyTypeObject *tp, slot_cache *c)
{
    PyObject *descr;
    PyMemberDef *member;

    Py_CLEAR(c->type);
    if (tp->tp_getattro != PyObject_GenericGetAttr) {
        return;
    }
    descr = _PyType_Lookup(tp, c->name); /* borrowed; gives the type a version tag */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) || tp->tp_version_tag == 0) {
        return;
    }
    member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || member->offset <= 0 ||
        PyDescr_TYPE(descr) == NULL || !PyType_IsSubtype(tp, PyDescr_TYPE(descr))) {
        return;
    }
    c->type = (PyTypeObject *)Py_NewRef((PyObject *)tp);
    c->version = tp->tp_version_tag;
    c->offset = member->offset;
}

/* getattr(obj, c->name) as a new reference, NULL with an error set */
static PyObject *
get_slot(PyObject *obj, slot_cache *c)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == c->type && tp->tp_version_tag == c->version && c->version != 0) {
        PyObject *v = *(PyObject **)((char *)obj + c->offset);
        if (v != NULL) {
            return Py_NewRef(v);
        }
    }
    else {
        cache_slot(tp, c);
    }
    return PyObject_GetAttr(obj, c->name);
}

/* collections.deque and its append and popleft (method descriptors): called directly on an
   exact deque, without looking the method up on each call; anything else by name */
static PyObject *deque_type, *deque_append, *deque_popleft;

static PyObject *
append_to(PyObject *obj, PyObject *item)
{
    if (Py_TYPE(obj) == (PyTypeObject *)deque_type) {
        PyObject *args[2] = {obj, item};
        return PyObject_Vectorcall(deque_append, args, 2, NULL);
    }
    return PyObject_CallMethodOneArg(obj, str_append, item);
}

static PyObject *
popleft_of(PyObject *obj)
{
    if (Py_TYPE(obj) == (PyTypeObject *)deque_type) {
        PyObject *args[1] = {obj};
        return PyObject_Vectorcall(deque_popleft, args, 1, NULL);
    }
    return PyObject_CallMethodNoArgs(obj, str_popleft);
}

static slot_cache slot_framer_state, slot_framer_buf, slot_framer_methods;
static slot_cache slot_head_headers, slot_head_method, slot_head_target;
static slot_cache slot_conn_sandbox_id, slot_conn_port;

/* PyObject_GetBuffer(o, view, PyBUF_SIMPLE), but an exact bytes object's pointer and size are
   taken directly (no export, no reference: the caller holds one to ``o`` while it reads, and
   bytes never change); PyBuffer_Release does nothing for it (its ``obj`` is NULL). */
static int
get_view(PyObject *o, Py_buffer *view)
{
    if (PyBytes_CheckExact(o)) {
        view->buf = PyBytes_AS_STRING(o);
        view->len = PyBytes_GET_SIZE(o);
        view->obj = NULL;
        return 0;
    }
    return PyObject_GetBuffer(o, view, PyBUF_SIMPLE);
}

/* exactly ``want`` positional arguments (a TypeError as Python's otherwise) */
static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", name, want,
                     nargs);
        return 0;
    }
    return 1;
}

/* An int as long long (OverflowError past it). PyLong_AsLong where long has 64 bits: on 3.11
   PyLong_AsLongLong converts every int of two 30-bit digits or more (the clocks' values)
   through _PyLong_AsByteArray, several times the cost. */
static long long
as_long_long(PyObject *v)
{
#if LONG_MAX == LLONG_MAX
    return (long long)PyLong_AsLong(v);
#else
    return PyLong_AsLongLong(v);
#endif
}

static int
lower_ascii(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

/* name[0:len] equals the lower-case ASCII ``want`` (of length ``want_len``), ignoring ASCII case */
static int
name_is(const unsigned char *name, Py_ssize_t len, const char *want, Py_ssize_t want_len)
{
    if (len != want_len) {
        return 0;
    }
    for (Py_ssize_t k = 0; k < len; k++) {
        if (lower_ascii(name[k]) != (unsigned char)want[k]) {
            return 0;
        }
    }
    return 1;
}

/* The first index >= i of p[0:n] that holds CR or LF, or n: the end of a field value or reason
   phrase (any other byte). Most of a head is values: sixteen bytes at a time with SSE2 (two
   byte compares and a mask), else eight (a word has a CR or LF byte iff x ^ 0x0d0d.. or
   x ^ 0x0a0a.. has a zero byte; below the first zero byte the test has no false positive, so on
   a little-endian machine the lowest bit it sets is that byte's), then byte by byte. Reads stay
   below n: a block is loaded only when it fits. */
#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)
static Py_ssize_t
line_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');
    while (n - i >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        unsigned int m = (unsigned int)_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)));
        if (m != 0) {
            return i + __builtin_ctz(m);
        }
        i += 16;
    }
#endif
    while (n - i >= 8) {
        uint64_t v, a, b, m;
        memcpy(&v, p + i, 8);
        a = v ^ (ONES * '\r');
        b = v ^ (ONES * '\n');
        m = (((a - ONES) & ~a) | ((b - ONES) & ~b)) & HIGHS;
        if (m != 0) {
#if PY_LITTLE_ENDIAN && defined(__GNUC__)
            return i + (Py_ssize_t)(__builtin_ctzll(m) >> 3);
#else
            break;
#endif
        }
        i += 8;
    }
    while (i < n && p[i] != '\r' && p[i] != '\n') {
        i++;
    }
    return i;
}

/* The first index >= i of p[0:n] that is not a tchar, or n: the end of a header name. Names
   are mostly letters, digits and '-': sixteen bytes at a time with SSE2 while they are (letters
   as (c | 0x20) in 'a'..'z', signed compares, so bytes >= 0x80 fail every range), then byte by
   byte from the first other byte, which takes the other tchars. Reads stay below n. */
static Py_ssize_t
token_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
#if defined(__SSE2__)
    const __m128i case_bit = _mm_set1_epi8(0x20), dash = _mm_set1_epi8('-');
    const __m128i before_a = _mm_set1_epi8('a' - 1), after_z = _mm_set1_epi8('z' + 1);
    const __m128i before_0 = _mm_set1_epi8('0' - 1), after_9 = _mm_set1_epi8('9' + 1);
    while (n - i >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        __m128i low = _mm_or_si128(v, case_bit);
        __m128i alpha = _mm_and_si128(_mm_cmpgt_epi8(low, before_a), _mm_cmpgt_epi8(after_z, low));
        __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(v, before_0), _mm_cmpgt_epi8(after_9, v));
        __m128i ok = _mm_or_si128(_mm_or_si128(alpha, digit), _mm_cmpeq_epi8(v, dash));
        unsigned int m = (unsigned int)_mm_movemask_epi8(ok) ^ 0xFFFFu;
        if (m != 0) {
            i += __builtin_ctz(m);
            break;
        }
        i += 16;
    }
#endif
    while (i < n && is_token[p[i]]) {
        i++;
    }
    return i;
}

/* The head at the start of p[0:n] as _SIMPLE_RE matches it (``match``, not ``fullmatch``):
   "HTTP/1.[01] " + a status 2xx-5xx + an optional " reason" (no CR or LF) + CRLF, header lines
   "token: value" (value without CR or LF) + CRLF, exactly one of them Content-Length with 1-18
   digits between optional spaces and tabs, none Transfer-Encoding or X-Request-Id (ASCII case
   ignored), then CRLF. Returns 1 and sets *status, *end (just past the blank line) and *length;
   0 if it does not match. Every index is checked against n before it is read. */
static int
match_simple(const unsigned char *p, Py_ssize_t n, int *status, Py_ssize_t *end,
             long long *length)
{
    Py_ssize_t i;
    int seen_length = 0;
    long long value = 0;

    if (n < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ') {
        return 0;
    }
    if (p[9] < '2' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9') {
        return 0;
    }
    *status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    i = 12;
    if (i < n && p[i] == ' ') {
        i = line_end(p, i + 1, n);
    }
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n') {
        return 0;
    }
    i += 2;
    for (;;) {
        Py_ssize_t name_start;
        Py_ssize_t name_len;

        if (i + 1 < n && p[i] == '\r' && p[i + 1] == '\n') {
            if (!seen_length) {
                return 0;
            }
            *end = i + 2;
            *length = value;
            return 1;
        }
        name_start = i;
        i = token_end(p, i, n);
        name_len = i - name_start;
        if (name_len == 0 || i >= n || p[i] != ':') {
            return 0;
        }
        i++; /* past ':' */
        if (name_is(p + name_start, name_len, "content-length", 14)) {
            Py_ssize_t digits;
            if (seen_length) {
                return 0;
            }
            seen_length = 1;
            while (i < n && (p[i] == ' ' || p[i] == '\t')) {
                i++;
            }
            digits = i;
            value = 0;
            while (i < n && p[i] >= '0' && p[i] <= '9') {
                if (i - digits >= MAX_LENGTH_DIGITS) {
                    return 0; /* 19 digits or more: [0-9]{1,18} cannot be followed by CRLF */
                }
                value = value * 10 + (p[i] - '0');
                i++;
            }
            if (i == digits) {
                return 0;
            }
            while (i < n && (p[i] == ' ' || p[i] == '\t')) {
                i++;
            }
        }
        else if (name_is(p + name_start, name_len, "transfer-encoding", 17) ||
                 name_is(p + name_start, name_len, "x-request-id", 12)) {
            return 0;
        }
        else {
            i = line_end(p, i, n);
        }
        if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n') {
            return 0;
        }
        i += 2;
    }
}

/* match_simple plus the checks of ResponseFramer.whole: not 204 or 304, and the body is
   exactly the rest of the data. */
static int
simple_response(const unsigned char *p, Py_ssize_t n, int *status, Py_ssize_t *end)
{
    long long length;
    if (!match_simple(p, n, status, end, &length)) {
        return 0;
    }
    if (*status == 204 || *status == 304) {
        return 0;
    }
    /* *end <= n and length < 10**18: no overflow in the subtraction */
    return (long long)(n - *end) == length;
}

static PyObject *
pair_of_ints(long a, Py_ssize_t b)
{
    PyObject *x, *y, *t;
    if ((x = PyLong_FromLong(a)) == NULL) {
        return NULL;
    }
    if ((y = PyLong_FromSsize_t(b)) == NULL) {
        Py_DECREF(x);
        return NULL;
    }
    t = PyTuple_Pack(2, x, y);
    Py_DECREF(x);
    Py_DECREF(y);
    return t;
}

PyDoc_STRVAR(simple_head_doc,
"simple_head(data, /)\n--\n\n"
"(status, head length) when ``data`` is one whole response of the common kind, else None\n"
"(responses.simple_head_py).");

static PyObject *
simple_head(PyObject *module, PyObject *data)
{
    Py_buffer view;
    int status = 0;
    Py_ssize_t end = 0;
    int ok;

    if (get_view(data, &view) < 0) {
        return NULL;
    }
    ok = simple_response((const unsigned char *)view.buf, view.len, &status, &end);
    PyBuffer_Release(&view);
    if (!ok) {
        Py_RETURN_NONE;
    }
    return pair_of_ints(status, end);
}

/* 1: ``framer`` is waiting for a head, holds nothing and its next request is not HEAD;
   0: not; -1: an error is set. On 1, *methods is a new reference to its deque. */
static int
framer_ready(PyObject *framer, PyObject **methods)
{
    PyObject *state, *buf, *first;
    int r;

    *methods = NULL;
    state = get_slot(framer, &slot_framer_state);
    if (state == NULL) {
        return -1;
    }
    /* _state == _HEAD (0); RichCompareBool's own identity check, without the call */
    r = state == int_zero ? 1 : PyObject_RichCompareBool(state, int_zero, Py_EQ);
    Py_DECREF(state);
    if (r <= 0) {
        return r;
    }
    buf = get_slot(framer, &slot_framer_buf);
    if (buf == NULL) {
        return -1;
    }
    /* not bool(_buf): an exact bytearray's size read directly */
    r = PyByteArray_CheckExact(buf) ? PyByteArray_GET_SIZE(buf) != 0 : PyObject_IsTrue(buf);
    Py_DECREF(buf);
    if (r != 0) {
        return r < 0 ? -1 : 0;
    }
    *methods = get_slot(framer, &slot_framer_methods);
    if (*methods == NULL) {
        return -1;
    }
    /* bool(_methods): an exact deque's length is its ob_size (collections.deque's own len) */
    r = Py_TYPE(*methods) == (PyTypeObject *)deque_type ? Py_SIZE(*methods) != 0
                                                        : PyObject_IsTrue(*methods);
    if (r <= 0) {
        Py_CLEAR(*methods);
        return r;
    }
    first = PySequence_GetItem(*methods, 0);
    if (first == NULL) {
        Py_CLEAR(*methods);
        return -1;
    }
    if (PyBytes_CheckExact(first)) { /* == b"HEAD" for bytes, as bytes' own compare */
        r = PyBytes_GET_SIZE(first) == 4 && memcmp(PyBytes_AS_STRING(first), "HEAD", 4) == 0;
    }
    else {
        r = PyObject_RichCompareBool(first, bytes_head, Py_EQ);
    }
    Py_DECREF(first);
    if (r != 0) {
        Py_CLEAR(*methods);
        return r < 0 ? -1 : 0;
    }
    return 1;
}

/* The request lists of tunneld/accesslog.py (ConnectionLog): the indices read and written here */
enum {
    R_METHOD = 0,
    R_TARGET = 1,
    R_ID = 2,
    R_STARTED = 3,
    R_TTFB = 4,
    R_BODY_IN = 5,
    R_ID_LINE = 7,
    R_STATUS = 8,
    R_BODY_OUT = 9,
    R_SIZE = 10
};

/* now - started: in C for two ints whose difference fits (the clocks' values), else as Python
   does it */
static PyObject *
elapsed(PyObject *now, PyObject *started)
{
    if (PyLong_CheckExact(now) && PyLong_CheckExact(started)) {
        long long a = as_long_long(now), b, d;
        if (!(a == -1 && PyErr_Occurred())) {
            b = as_long_long(started);
            if (!(b == -1 && PyErr_Occurred()) && !__builtin_sub_overflow(a, b, &d)) {
                return PyLong_FromLongLong(d);
            }
        }
        PyErr_Clear(); /* past 64 bits: Python's arithmetic */
    }
    return PyNumber_Subtract(now, started);
}

/* ns / 1e9 as Python computes it, into *out: an int within 2**53 converts to a double exactly,
   and a larger one rounds to nearest as int.__truediv__'s conversion does; else through Python.
   0, or -1 with an error set. */
static int
ns_to_seconds(PyObject *ns, double *out)
{
    PyObject *f;
    if (PyLong_CheckExact(ns)) {
        long long x = as_long_long(ns);
        if (!(x == -1 && PyErr_Occurred()) && x > -(1LL << 53) && x < (1LL << 53)) {
            *out = (double)x / 1e9;
            return 0;
        }
        PyErr_Clear();
    }
    if ((f = PyNumber_TrueDivide(ns, float_1e9)) == NULL) {
        return -1;
    }
    *out = PyFloat_AsDouble(f);
    Py_DECREF(f);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* -- Tally: the metrics' observations of whole responses (metrics.Tally is the reference) ----- */

#define TALLY_CLASSES 6     /* 1xx, 2xx, 3xx, 4xx, 5xx, anything else */
#define TALLY_MAX_BOUNDS 64 /* metrics.REQUEST_BUCKETS has 16 */

/* Counted as each observation comes: no object is kept per observation. Byte sums that no
   longer fit in 64 bits go on in Python ints (``carry_*``), so nothing is lost or wraps. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t nbounds;
    Py_ssize_t n; /* observations since take() */
    double bounds[TALLY_MAX_BOUNDS];
    unsigned long long counts[TALLY_MAX_BOUNDS + 1];
    unsigned long long statuses[TALLY_CLASSES];
    double total;
    unsigned long long body_in, body_out;
    PyObject *carry_in, *carry_out; /* ints, or NULL */
} TallyObject;

static PyTypeObject Tally_Type;

/* acc += v for a byte count v (an int): in 64 bits while it fits, else into *carry (a new int
   made by Python's addition, so any int is exact). Nothing changes on error. The new carry is
   returned in *fresh (a new reference, or NULL when *carry stays as it is). */
static int
tally_bytes(unsigned long long acc, PyObject *carry, PyObject *v, unsigned long long *sum,
            PyObject **fresh)
{
    PyObject *base, *plus;
    *fresh = NULL;
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "byte counts must be ints");
        return -1;
    }
    if (PyLong_CheckExact(v)) {
        unsigned long long x = PyLong_AsUnsignedLongLong(v);
        if (!(x == (unsigned long long)-1 && PyErr_Occurred())) {
            if (!__builtin_add_overflow(acc, x, sum)) {
                return 0;
            }
        }
        else {
            PyErr_Clear(); /* negative, or past 64 bits */
        }
    }
    /* carry + acc + v, and the 64-bit part starts again from 0 */
    if ((base = PyLong_FromUnsignedLongLong(acc)) == NULL) {
        return -1;
    }
    if (carry != NULL) {
        PyObject *b = PyNumber_Add(carry, base);
        Py_DECREF(base);
        if ((base = b) == NULL) {
            return -1;
        }
    }
    plus = PyNumber_Add(base, v);
    Py_DECREF(base);
    if (plus == NULL) {
        return -1;
    }
    *fresh = plus;
    *sum = 0;
    return 0;
}

/* The sums' 64-bit parts and carries after one observation (tally_bytes, tally_add_u64) and
   its duration in seconds: counted. Cannot fail. */
static void
tally_count(TallyObject *t, double seconds, long long status, unsigned long long in_sum,
            PyObject *in_carry, unsigned long long out_sum, PyObject *out_carry)
{
    Py_ssize_t i = 0;
    int klass;
    if (in_carry != NULL) {
        Py_XSETREF(t->carry_in, in_carry);
    }
    if (out_carry != NULL) {
        Py_XSETREF(t->carry_out, out_carry);
    }
    t->body_in = in_sum;
    t->body_out = out_sum;
    while (i < t->nbounds && t->bounds[i] < seconds) { /* most are in the first buckets */
        i++;
    }
    t->counts[i]++;
    t->total += seconds;
    klass = (status >= 100 && status <= 599) ? (int)(status / 100) - 1 : TALLY_CLASSES - 1;
    t->statuses[klass]++;
    t->n++;
}

/* One observation: ``ns`` (an int: the duration in ns), a status, body sizes (ints). 0, or -1
   with an error set and nothing counted. */
static int
tally_observe(TallyObject *t, PyObject *ns, long long status, PyObject *body_in,
              PyObject *body_out)
{
    double seconds;
    unsigned long long in_sum, out_sum;
    PyObject *in_carry, *out_carry;

    if (ns_to_seconds(ns, &seconds) < 0) {
        return -1;
    }
    if (tally_bytes(t->body_in, t->carry_in, body_in, &in_sum, &in_carry) < 0) {
        return -1;
    }
    if (tally_bytes(t->body_out, t->carry_out, body_out, &out_sum, &out_carry) < 0) {
        Py_XDECREF(in_carry);
        return -1;
    }
    tally_count(t, seconds, status, in_sum, in_carry, out_sum, out_carry);
    return 0;
}

/* acc + x as tally_bytes adds an int x: in 64 bits while it fits, else into a new carry */
static int
tally_add_u64(unsigned long long acc, PyObject *carry, unsigned long long x,
              unsigned long long *sum, PyObject **fresh)
{
    PyObject *v;
    int r;
    *fresh = NULL;
    if (!__builtin_add_overflow(acc, x, sum)) {
        return 0;
    }
    if ((v = PyLong_FromUnsignedLongLong(x)) == NULL) {
        return -1;
    }
    r = tally_bytes(acc, carry, v, sum, fresh);
    Py_DECREF(v);
    return r;
}

/* tally_observe of values held in C: 0 <= ns < 2**53 (exact as a double, as ns_to_seconds),
   body sizes >= 0. 0, or -1 with an error set (memory for a carry) and nothing counted. */
static int
tally_observe_ll(TallyObject *t, long long ns, long long status, long long body_in,
                 long long body_out)
{
    unsigned long long in_sum, out_sum;
    PyObject *in_carry, *out_carry;

    if (tally_add_u64(t->body_in, t->carry_in, (unsigned long long)body_in, &in_sum,
                      &in_carry) < 0) {
        return -1;
    }
    if (tally_add_u64(t->body_out, t->carry_out, (unsigned long long)body_out, &out_sum,
                      &out_carry) < 0) {
        Py_XDECREF(in_carry);
        return -1;
    }
    tally_count(t, (double)ns / 1e9, status, in_sum, in_carry, out_sum, out_carry);
    return 0;
}

PyDoc_STRVAR(tally_doc,
"tally(bounds, /)\n--\n\n"
"A new Tally counting durations into the buckets of ``bounds`` (sorted floats)\n"
"(metrics.tally_py).");

static PyObject *
tally_new(PyObject *module, PyObject *bounds)
{
    PyObject *seq;
    TallyObject *t;
    Py_ssize_t n;

    if ((seq = PySequence_Fast(bounds, "bounds must be a sequence")) == NULL) {
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    if (n > TALLY_MAX_BOUNDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d bounds", TALLY_MAX_BOUNDS);
        return NULL;
    }
    t = PyObject_New(TallyObject, &Tally_Type);
    if (t == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    t->nbounds = n;
    t->n = 0;
    t->total = 0.0;
    t->body_in = t->body_out = 0;
    t->carry_in = t->carry_out = NULL;
    memset(t->counts, 0, sizeof(t->counts));
    memset(t->statuses, 0, sizeof(t->statuses));
    for (Py_ssize_t k = 0; k < n; k++) {
        double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, k));
        if (b == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            Py_DECREF(t);
            return NULL;
        }
        if (b != b || (k > 0 && !(b > t->bounds[k - 1]))) {
            Py_DECREF(seq);
            Py_DECREF(t);
            PyErr_SetString(PyExc_ValueError, "bounds must be increasing numbers");
            return NULL;
        }
        t->bounds[k] = b;
    }
    Py_DECREF(seq);
    return (PyObject *)t;
}

static void
tally_dealloc(TallyObject *t)
{
    Py_XDECREF(t->carry_in);
    Py_XDECREF(t->carry_out);
    PyObject_Free(t);
}

static Py_ssize_t
tally_len(TallyObject *t)
{
    return t->n;
}

static PyObject *
tally_add(TallyObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    long long status;
    int overflow;

    if (!check_nargs("add", nargs, 4)) {
        return NULL;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "status must be an int");
        return NULL;
    }
    status = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (status == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow) {
        status = -1; /* far out of range: not a status class */
    }
    if (tally_observe(t, args[0], status, args[2], args[3]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* a byte sum as an int: the carry plus the 64-bit part */
static PyObject *
tally_sum(unsigned long long part, PyObject *carry)
{
    PyObject *v = PyLong_FromUnsignedLongLong(part), *r;
    if (v == NULL || carry == NULL) {
        return v;
    }
    r = PyNumber_Add(carry, v);
    Py_DECREF(v);
    return r;
}

static PyObject *
tally_take(TallyObject *t, PyObject *unused)
{
    PyObject *counts = NULL, *statuses = NULL, *in = NULL, *out = NULL, *r;

    if ((counts = PyList_New(t->nbounds + 1)) == NULL ||
        (statuses = PyList_New(TALLY_CLASSES)) == NULL) {
        goto fail;
    }
    for (Py_ssize_t k = 0; k <= t->nbounds; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(t->counts[k]);
        if (v == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(counts, k, v);
    }
    for (int k = 0; k < TALLY_CLASSES; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(t->statuses[k]);
        if (v == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(statuses, k, v);
    }
    if ((in = tally_sum(t->body_in, t->carry_in)) == NULL ||
        (out = tally_sum(t->body_out, t->carry_out)) == NULL) {
        goto fail;
    }
    r = Py_BuildValue("(NdNNN)", counts, t->total, statuses, in, out);
    if (r == NULL) {
        return NULL; /* "N" took the references, built or not */
    }
    memset(t->counts, 0, sizeof(t->counts));
    memset(t->statuses, 0, sizeof(t->statuses));
    t->total = 0.0;
    t->body_in = t->body_out = 0;
    Py_CLEAR(t->carry_in);
    Py_CLEAR(t->carry_out);
    t->n = 0;
    return r;
fail:
    Py_XDECREF(counts);
    Py_XDECREF(statuses);
    Py_XDECREF(in);
    Py_XDECREF(out);
    return NULL;
}

static PyMethodDef tally_methods[] = {
    {"add", (PyCFunction)(void (*)(void))tally_add, METH_FASTCALL,
     "add(ns, status, body_in, body_out, /)\n--\n\nOne whole response (metrics.Tally.add)."},
    {"take", (PyCFunction)tally_take, METH_NOARGS,
     "take()\n--\n\nWhat was counted, then zero (metrics.Tally.take)."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods tally_as_sequence = {
    .sq_length = (lenfunc)tally_len,
};

static PyTypeObject Tally_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunneld._speedups.Tally",
    .tp_basicsize = sizeof(TallyObject),
    .tp_dealloc = (destructor)tally_dealloc,
    .tp_as_sequence = &tally_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Whole responses' observations, counted as they come (metrics.Tally).",
    .tp_methods = tally_methods,
};

PyDoc_STRVAR(whole_response_doc,
"whole_response(framer, data, request, now, kept, /)\n--\n\n"
"When ResponseFramer.whole(data) takes the response: its time, status and body size noted in\n"
"``request``, its observation added to ``kept`` (unless None), and ``data`` with the\n"
"request's id line before its head's blank line returned; else None\n"
"(accesslog.whole_response_py).");

/* whole_response's first step: 1 when ``framer`` waits for a head with nothing held and its
   next request is not HEAD, and ``data`` is one whole response of the common kind: *methods (a
   new reference to the framer's deque) and *view (data's, to release) held, *status and *end
   (the head's length) set. 0: not (nothing held, nothing changed); -1: an error is set. */
static int
match_whole(PyObject *framer, PyObject *data, PyObject **methods, Py_buffer *view, int *status,
            Py_ssize_t *end)
{
    int r = framer_ready(framer, methods);
    if (r <= 0) {
        return r;
    }
    if (get_view(data, view) < 0) {
        Py_CLEAR(*methods);
        return -1;
    }
    if (!simple_response((const unsigned char *)view->buf, view->len, status, end)) {
        PyBuffer_Release(view);
        Py_CLEAR(*methods);
        return 0;
    }
    return 1;
}

/* log_response's output buffer, reused. Each whole response is a new bytes object of its size
   plus the id line; at ~1.3 KB for a 1 KB body that is past glibc's per-thread cache (1032
   bytes), and its malloc and free cost ~430 instructions and ~40 instruction-cache misses per
   request, more than the copy (docs/performance.md). The last output is kept here, and when
   nothing but this holds it any more (the transport wrote it and dropped it: a partial write
   keeps a reference, and then a new one is made) the next output is written into it instead:
   its size set down to what it holds (never above what it was made with, ``spare_cap``), the
   NUL after it written, its cached hash cleared. Nothing else can see the change: an object
   no one else refers to. Outputs above SPARE_MAX are not kept (one per process, never more than
   that). Only where the refcount says so: not on free-threaded builds. */
#define SPARE_MAX 65536
static PyObject *spare;       /* bytes, or NULL */
static Py_ssize_t spare_cap;  /* the size ``spare`` was made with */

static PyObject *
output_bytes(Py_ssize_t size)
{
    PyObject *out;
#ifndef Py_GIL_DISABLED
    if (spare != NULL && Py_REFCNT(spare) == 1 && size <= spare_cap) {
        Py_SET_SIZE(spare, size);
        PyBytes_AS_STRING(spare)[size] = '\0';
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
        ((PyBytesObject *)spare)->ob_shash = -1; /* deprecated (3.11), still its hash cache */
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
        return Py_NewRef(spare);
    }
#endif
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out != NULL && size >= 2 && size <= SPARE_MAX) { /* >= 2: never a shared singleton */
        Py_XSETREF(spare, Py_NewRef(out));
        spare_cap = size;
    }
    return out;
}

/* The response (``view``, its head ``end`` bytes long) with the id line ``idv`` before the
   blank line that ends its head, as bytes (``reuse``: in output_bytes's buffer when it can) */
static PyObject *
with_id_line(const Py_buffer *view, Py_ssize_t end, const Py_buffer *idv, int reuse)
{
    PyObject *out;
    char *w;
    if (idv->len > PY_SSIZE_T_MAX - view->len) {
        return PyErr_NoMemory();
    }
    out = reuse ? output_bytes(view->len + idv->len)
                : PyBytes_FromStringAndSize(NULL, view->len + idv->len);
    if (out == NULL) {
        return NULL;
    }
    /* end >= 2 (the head ends with CRLF CRLF): the id line goes before the last CRLF */
    w = PyBytes_AS_STRING(out);
    memcpy(w, view->buf, (size_t)(end - 2));
    memcpy(w + end - 2, idv->buf, (size_t)idv->len);
    memcpy(w + end - 2 + idv->len, (const char *)view->buf + end - 2,
           (size_t)(view->len - end + 2));
    return out;
}

/* The framer's expected method of the response just taken leaves its deque: 0, or -1 */
static int
expected_taken(PyObject *methods)
{
    PyObject *popped = popleft_of(methods);
    if (popped == NULL) {
        return -1;
    }
    Py_DECREF(popped);
    return 0;
}

static PyObject *
whole_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *framer, *data, *request, *now, *kept, *methods = NULL;
    PyObject *id_line = NULL, *started = NULL, *ns = NULL, *body_in = NULL;
    PyObject *status_obj = NULL, *body_out_obj = NULL, *out = NULL;
    Py_buffer view, idv;
    int status = 0, r, have_view = 0, have_idv = 0;
    Py_ssize_t end = 0;

    if (!check_nargs("whole_response", nargs, 5)) {
        return NULL;
    }
    framer = args[0];
    data = args[1];
    request = args[2];
    now = args[3];
    kept = args[4];
    if (!PyList_Check(request) || PyList_GET_SIZE(request) < R_SIZE) {
        PyErr_SetString(PyExc_TypeError, "request must be a list of at least 10 items");
        return NULL;
    }
    if (kept != Py_None && !Py_IS_TYPE(kept, &Tally_Type)) {
        PyErr_SetString(PyExc_TypeError, "kept must be a Tally or None");
        return NULL;
    }
    r = match_whole(framer, data, &methods, &view, &status, &end);
    if (r <= 0) {
        if (r < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    have_view = 1;
    /* Everything that can fail on the caller's arguments before the framer changes. Items are
       held by strong references: arithmetic on odd objects can run Python code. */
    if (PyList_GET_SIZE(request) < R_SIZE) {
        PyErr_SetString(PyExc_TypeError, "request must be a list of at least 10 items");
        goto fail;
    }
    id_line = Py_NewRef(PyList_GET_ITEM(request, R_ID_LINE));
    started = Py_NewRef(PyList_GET_ITEM(request, R_STARTED));
    body_in = Py_NewRef(PyList_GET_ITEM(request, R_BODY_IN));
    if (get_view(id_line, &idv) < 0) {
        goto fail;
    }
    have_idv = 1;
    if ((ns = elapsed(now, started)) == NULL) {
        goto fail;
    }
    if ((status_obj = PyLong_FromLong(status)) == NULL ||
        (body_out_obj = PyLong_FromSsize_t(view.len - end)) == NULL) {
        goto fail;
    }
    if ((out = with_id_line(&view, end, &idv, 0)) == NULL || expected_taken(methods) < 0) {
        goto fail;
    }
    /* PyList_SetItem checks the index (the list may have shrunk) and steals the reference */
    if (PyList_SetItem(request, R_TTFB, Py_NewRef(ns)) < 0 ||
        PyList_SetItem(request, R_STATUS, Py_NewRef(status_obj)) < 0 ||
        PyList_SetItem(request, R_BODY_OUT, Py_NewRef(body_out_obj)) < 0) {
        goto fail;
    }
    if (kept != Py_None &&
        tally_observe((TallyObject *)kept, ns, status, body_in, body_out_obj) < 0) {
        goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    if (have_idv) {
        PyBuffer_Release(&idv);
    }
    if (have_view) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(methods);
    Py_XDECREF(id_line);
    Py_XDECREF(started);
    Py_XDECREF(body_in);
    Py_XDECREF(ns);
    Py_XDECREF(status_obj);
    Py_XDECREF(body_out_obj);
    return out;
}

/* An exact int that fits in a long long, into *out: 1; else 0 (no error set) */
static int
exact_ll(PyObject *v, long long *out)
{
    long long x;
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
    x = as_long_long(v);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

/* A whole response's numbers, held in C (log_response) */
typedef struct {
    int status;
    long long ns, body_in, body_out;
} whole_numbers;

/* whole_response of log_response, on numbers it reads into C: ``request`` an exact list of
   R_SIZE items or more whose start and body_in are exact ints with 0 <= now - start < 2**53
   (its Tally's seconds are then exact as in ns_to_seconds) and 0 <= body_in, ``kept`` a Tally
   or None. The request's items are not set: log_response drops the request it takes (the text
   line gets ``*n``). 1: taken, *out the bytes for the client; 0: not taken (nothing changed);
   -1: an error is set; 2: the request's numbers are not such (nothing changed: the caller
   calls whole_response). */
static int
whole_native(PyObject *framer, PyObject *data, PyObject *request, long long now, PyObject *kept,
             PyObject **out, whole_numbers *n)
{
    PyObject *methods = NULL, *id_line = NULL;
    Py_buffer view, idv;
    Py_ssize_t end = 0;
    long long started;
    int r;

    *out = NULL;
    r = match_whole(framer, data, &methods, &view, &n->status, &end);
    if (r <= 0) {
        return r;
    }
    /* read after the framer's: an odd framer runs Python code */
    if (PyList_GET_SIZE(request) < R_SIZE ||
        !exact_ll(PyList_GET_ITEM(request, R_STARTED), &started) ||
        !exact_ll(PyList_GET_ITEM(request, R_BODY_IN), &n->body_in) || n->body_in < 0 ||
        __builtin_sub_overflow(now, started, &n->ns) || n->ns < 0 || n->ns >= (1LL << 53)) {
        r = 2;
        goto done;
    }
    id_line = Py_NewRef(PyList_GET_ITEM(request, R_ID_LINE));
    if (get_view(id_line, &idv) < 0) {
        r = -1;
        goto done;
    }
    *out = with_id_line(&view, end, &idv, 1);
    PyBuffer_Release(&idv);
    n->body_out = view.len - end;
    if (*out == NULL || expected_taken(methods) < 0 ||
        (kept != Py_None &&
         tally_observe_ll((TallyObject *)kept, n->ns, n->status, n->body_in, n->body_out) < 0)) {
        Py_CLEAR(*out);
        r = -1;
        goto done;
    }
    r = 1;
done:
    PyBuffer_Release(&view);
    Py_DECREF(methods);
    Py_XDECREF(id_line);
    return r;
}

/* A non-negative int argument as long long; -1 with an error set otherwise. */
static long long
non_negative(PyObject *v, const char *what)
{
    long long x;
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    x = as_long_long(v);
    if (x == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (x < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative", what);
        return -1;
    }
    return x;
}

static int
need_bytes(PyObject *v, const char *what)
{
    if (!PyBytes_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return -1;
    }
    return 0;
}

/* A decimal number (and "d.d" tenths) is at most 21 characters: INT64 has 19 digits. */
#define NUM_MAX 24

/* "00" to "99": two digits per step of decimal() */
static const char DIGIT_PAIRS[] =
    "0001020304050607080910111213141516171819202122232425262728293031323334353637383940414243"
    "4445464748495051525354555657585960616263646566676869707172737475767778798081828384858687"
    "888990919293949596979899";

/* x >= 0 in decimal into out (at least NUM_MAX bytes); returns the length. No snprintf: it
   costs more than the rest of the line. Statuses, small sizes and durations (below 1000) in
   one or two steps, the rest two digits at a time. */
static NOINLINE int
decimal(long long x, char *out)
{
    char tmp[NUM_MAX];
    int k = NUM_MAX, len;
    unsigned long long v = (unsigned long long)x;
    if (v < 10) {
        out[0] = (char)('0' + v);
        return 1;
    }
    if (v < 100) {
        memcpy(out, DIGIT_PAIRS + 2 * v, 2);
        return 2;
    }
    if (v < 1000) {
        out[0] = (char)('0' + v / 100);
        memcpy(out + 1, DIGIT_PAIRS + 2 * (v % 100), 2);
        return 3;
    }
    while (v >= 100) { /* at most 20 digits: k stays >= NUM_MAX - 20 */
        k -= 2;
        memcpy(tmp + k, DIGIT_PAIRS + 2 * (v % 100), 2);
        v /= 100;
    }
    if (v >= 10) {
        k -= 2;
        memcpy(tmp + k, DIGIT_PAIRS + 2 * v, 2);
    }
    else {
        tmp[--k] = (char)('0' + v);
    }
    len = NUM_MAX - k;
    memcpy(out, tmp + k, (size_t)len);
    return len;
}

PyDoc_STRVAR(text_line_doc,
"text_line(pending, stamp, sec, now, lead, request, site, /)\n--\n\n"
"Append the access log's text line of a whole response to ``pending``; return its length,\n"
"or -1 (nothing appended) when ``now`` is not in second ``sec`` of ``stamp``\n"
"(accesslog.text_line_py).");

/* text_line's checks of the objects it reads, with its errors in its order: 0, or -1 */
static int
line_objects(PyObject *pending, PyObject *stamp, PyObject *lead, PyObject *request,
             PyObject *site)
{
    if (!PyList_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "pending must be a list");
        return -1;
    }
    if (need_bytes(stamp, "stamp") || need_bytes(lead, "lead") || need_bytes(site, "site")) {
        return -1;
    }
    if (!PyList_Check(request) || PyList_GET_SIZE(request) < R_SIZE) {
        PyErr_SetString(PyExc_TypeError, "request must be a list of at least 10 items");
        return -1;
    }
    if (need_bytes(PyList_GET_ITEM(request, R_METHOD), "method") ||
        need_bytes(PyList_GET_ITEM(request, R_TARGET), "target") ||
        need_bytes(PyList_GET_ITEM(request, R_ID), "request id")) {
        return -1;
    }
    return 0;
}

/* text_line's line, from objects line_objects took (nothing may run Python code in between:
   the request's items are borrowed) and numbers that are not negative (but ``sec``): the
   number of pending lines after it is appended; -1 (nothing appended) when ``now`` is not in
   second ``sec``; -2 with an error set. */
static Py_ssize_t
put_line(PyObject *pending, PyObject *stamp, long long sec, long long now, PyObject *lead,
         PyObject *request, PyObject *site, long long status, long long body_in,
         long long body_out, long long ns)
{
    PyObject *method = PyList_GET_ITEM(request, R_METHOD);
    PyObject *target = PyList_GET_ITEM(request, R_TARGET);
    PyObject *rid = PyList_GET_ITEM(request, R_ID);
    PyObject *line;
    long long ms, d10;
    char msecs[3], n_status[NUM_MAX], n_in[NUM_MAX], n_out[NUM_MAX], took[NUM_MAX];
    int l_status, l_in, l_out, l_took;
    Py_ssize_t t_len, t_extra = 0, total;
    const unsigned char *t;
    char *w;
    size_t sum;

    ms = now / 1000000;
    if (ms / 1000 != sec) {
        return -1; /* another second: the caller restamps and calls again */
    }
    if (ns > LLONG_MAX - 50000) {
        PyErr_SetString(PyExc_OverflowError, "ns too large");
        return -2;
    }
    d10 = (ns + 50000) / 100000; /* tenths of a millisecond, rounded half up */
    {
        int m = (int)(ms % 1000);
        msecs[0] = (char)('0' + m / 100);
        msecs[1] = (char)('0' + m / 10 % 10);
        msecs[2] = (char)('0' + m % 10);
    }
    l_status = decimal(status, n_status);
    l_in = decimal(body_in, n_in);
    l_out = decimal(body_out, n_out);
    l_took = decimal(d10 / 10, took);
    took[l_took++] = '.';
    took[l_took++] = (char)('0' + d10 % 10);
    /* the target's bytes as latin-1 characters in UTF-8: each byte >= 0x80 takes two */
    t = (const unsigned char *)PyBytes_AS_STRING(target);
    t_len = PyBytes_GET_SIZE(target);
    for (Py_ssize_t k = 0; k < t_len; k++) {
        t_extra += t[k] >> 7;
    }
    /* stamp msecs lead method " " target '" ' status " " in " " out "B " took "ms ttfb " took
       "ms" site id "\n": sizes of objects in memory, summed in size_t and checked */
    sum = (size_t)PyBytes_GET_SIZE(stamp) + 3 + (size_t)PyBytes_GET_SIZE(lead);
    sum += (size_t)PyBytes_GET_SIZE(method) + 1 + (size_t)t_len + (size_t)t_extra + 2;
    sum += (size_t)l_status + 1 + (size_t)l_in + 1 + (size_t)l_out + 2 + (size_t)l_took + 8;
    sum += (size_t)l_took + 2 + (size_t)PyBytes_GET_SIZE(site) + (size_t)PyBytes_GET_SIZE(rid) + 1;
    if (sum > (size_t)PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        return -2;
    }
    total = (Py_ssize_t)sum;
    line = PyBytes_FromStringAndSize(NULL, total);
    if (line == NULL) {
        return -2;
    }
    w = PyBytes_AS_STRING(line);
#define PUT(src, len) do { memcpy(w, (src), (size_t)(len)); w += (len); } while (0)
#define PUT_BYTES(o) PUT(PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o))
    PUT_BYTES(stamp);
    PUT(msecs, 3);
    PUT_BYTES(lead);
    PUT_BYTES(method);
    PUT(" ", 1);
    if (t_extra == 0) {
        PUT(t, t_len);
    }
    else {
        for (Py_ssize_t k = 0; k < t_len; k++) {
            unsigned char c = t[k];
            if (c < 0x80) {
                *w++ = (char)c;
            }
            else {
                *w++ = (char)(0xC0 | (c >> 6));
                *w++ = (char)(0x80 | (c & 0x3F));
            }
        }
    }
    PUT("\" ", 2);
    PUT(n_status, l_status);
    PUT(" ", 1);
    PUT(n_in, l_in);
    PUT(" ", 1);
    PUT(n_out, l_out);
    PUT("B ", 2);
    PUT(took, l_took);
    PUT("ms ttfb ", 8);
    PUT(took, l_took);
    PUT("ms", 2);
    PUT_BYTES(site);
    PUT_BYTES(rid);
    PUT("\n", 1);
#undef PUT_BYTES
#undef PUT
    if (w != PyBytes_AS_STRING(line) + total) { /* cannot happen: the sizes above are exact */
        Py_DECREF(line);
        PyErr_SetString(PyExc_SystemError, "text_line: size mismatch");
        return -2;
    }
    if (PyList_Append(pending, line) < 0) {
        Py_DECREF(line);
        return -2;
    }
    Py_DECREF(line);
    return PyList_GET_SIZE(pending);
}

static PyObject *
text_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *request;
    long long sec, now, status, body_in, body_out, ns;
    Py_ssize_t count;

    if (!check_nargs("text_line", nargs, 7)) {
        return NULL;
    }
    request = args[5];
    if (line_objects(args[0], args[1], args[4], request, args[6]) < 0) {
        return NULL;
    }
    if (!PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "sec must be an int");
        return NULL;
    }
    sec = as_long_long(args[2]); /* -1 before the first stamp */
    if (sec == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* ints are read with PyLong_AsLong(Long), which calls no __index__ on an int: no Python
       code runs before the line is made */
    if ((now = non_negative(args[3], "now")) < 0 ||
        (body_in = non_negative(PyList_GET_ITEM(request, R_BODY_IN), "body_in")) < 0 ||
        (status = non_negative(PyList_GET_ITEM(request, R_STATUS), "status")) < 0 ||
        (body_out = non_negative(PyList_GET_ITEM(request, R_BODY_OUT), "body_out")) < 0 ||
        (ns = non_negative(PyList_GET_ITEM(request, R_TTFB), "ns")) < 0) {
        return NULL;
    }
    count = put_line(args[0], args[1], sec, now, args[4], request, args[6], status, body_in,
                     body_out, ns);
    return count == -2 ? NULL : PyLong_FromSsize_t(count);
}

/* 1 if the buffer is a request id a client may choose (accesslog._VALID_ID), 0 if not */
static int
valid_client_id(const unsigned char *p, Py_ssize_t n)
{
    if (n < 1 || n > MAX_CLIENT_ID) {
        return 0;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!is_id_char[p[k]]) {
            return 0;
        }
    }
    return 1;
}

/* -- IdCounter: the request ids' counter, itertools.count's values read in C by make_ids ----- */

/* Its values in C while they fit in 64 bits; from 2**64 on (or a start outside them) in an int
   (``big``), as itertools.count goes on. */
typedef struct {
    PyObject_HEAD
    unsigned long long next;
    PyObject *big; /* NULL while ``next`` holds the next value */
} IdCounterObject;

static PyTypeObject IdCounter_Type;

/* The next value in C into *v: 1; 0 when it is no longer held in C (``big``); -1 with an error
   (nothing taken). */
static int
idcounter_take(IdCounterObject *c, unsigned long long *v)
{
    if (c->big != NULL) {
        return 0;
    }
    if (c->next == ULLONG_MAX) { /* the next one is 2**64: an int from here on */
        PyObject *top = PyLong_FromUnsignedLongLong(ULLONG_MAX), *one = PyLong_FromLong(1);
        c->big = (top == NULL || one == NULL) ? NULL : PyNumber_Add(top, one);
        Py_XDECREF(top);
        Py_XDECREF(one);
        if (c->big == NULL) {
            return -1;
        }
        *v = ULLONG_MAX;
        return 1;
    }
    *v = c->next++;
    return 1;
}

static PyObject *
idcounter_next(IdCounterObject *c)
{
    unsigned long long v;
    PyObject *r, *one, *after;
    int taken = idcounter_take(c, &v);
    if (taken != 0) {
        return taken < 0 ? NULL : PyLong_FromUnsignedLongLong(v);
    }
    if ((one = PyLong_FromLong(1)) == NULL) {
        return NULL;
    }
    after = PyNumber_Add(c->big, one);
    Py_DECREF(one);
    if (after == NULL) {
        return NULL;
    }
    r = c->big;
    c->big = after;
    return r;
}

static void
idcounter_dealloc(IdCounterObject *c)
{
    Py_XDECREF(c->big);
    PyObject_Free(c);
}

PyDoc_STRVAR(id_counter_doc,
"id_counter(start, /)\n--\n\n"
"An iterator of start, start + 1, ... as itertools.count(start) for an int ``start``, whose\n"
"values make_ids takes without making int objects (accesslog's request ids).");

static PyObject *
id_counter_new(PyObject *module, PyObject *start)
{
    IdCounterObject *c;
    unsigned long long v = 0;
    int in_c = 0;
    if (!PyLong_Check(start)) {
        PyErr_SetString(PyExc_TypeError, "start must be an int");
        return NULL;
    }
    if (PyLong_CheckExact(start)) {
        v = PyLong_AsUnsignedLongLong(start);
        in_c = !(v == (unsigned long long)-1 && PyErr_Occurred());
        PyErr_Clear(); /* negative or past 64 bits: held as an int */
    }
    c = PyObject_New(IdCounterObject, &IdCounter_Type);
    if (c == NULL) {
        return NULL;
    }
    c->next = v;
    c->big = NULL;
    if (!in_c) { /* 0 + start: an exact int (count() makes its values so of an int subclass) */
        PyObject *zero = PyLong_FromLong(0);
        c->big = zero == NULL ? NULL : PyNumber_Add(zero, start);
        Py_XDECREF(zero);
        if (c->big == NULL) {
            Py_DECREF(c);
            return NULL;
        }
    }
    return (PyObject *)c;
}

static PyTypeObject IdCounter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunneld._speedups.IdCounter",
    .tp_basicsize = sizeof(IdCounterObject),
    .tp_dealloc = (destructor)idcounter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The request ids' counter (itertools.count(start), its values read in C).",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)idcounter_next,
};

/* "00" to "ff" (filled in PyInit__speedups) */
static char HEX_PAIRS[512];

/* prefix + "%016x" % v, as bytes (prefix: bytes) */
static PyObject *
hex_id(PyObject *prefix, unsigned long long v)
{
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
    PyObject *out;
    char *w;
    if (plen > PY_SSIZE_T_MAX - 16) {
        return PyErr_NoMemory();
    }
    out = PyBytes_FromStringAndSize(NULL, plen + 16);
    if (out == NULL) {
        return NULL;
    }
    w = PyBytes_AS_STRING(out);
    memcpy(w, PyBytes_AS_STRING(prefix), (size_t)plen);
    for (int k = 14; k >= 0; k -= 2) { /* a byte (two digits) at a time */
        memcpy(w + plen + k, HEX_PAIRS + 2 * (v & 0xFF), 2);
        v >>= 8;
    }
    return out;
}

/* new_request_id for a counter whose value is not taken in C: next(counter) as Python does */
static COLD PyObject *
next_request_id(PyObject *counter, PyObject *prefix)
{
    PyObject *n, *digits, *out;

    if (!PyIter_Check(counter)) { /* PyIter_Next would call a NULL tp_iternext */
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not an iterator",
                     Py_TYPE(counter)->tp_name);
        return NULL;
    }
    n = PyIter_Next(counter);
    if (n == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        return NULL;
    }
    if (PyLong_CheckExact(n)) {
        unsigned long long v = PyLong_AsUnsignedLongLong(n);
        if (!(v == (unsigned long long)-1 && PyErr_Occurred())) {
            Py_DECREF(n);
            return hex_id(prefix, v);
        }
        PyErr_Clear(); /* negative or past 64 bits: as Python formats it */
    }
    digits = PyNumber_Remainder(bytes_hex16, n);
    Py_DECREF(n);
    if (digits == NULL) {
        return NULL;
    }
    out = PyNumber_Add(prefix, digits);
    Py_DECREF(digits);
    return out;
}

/* prefix + "%016x" % next(counter), as bytes */
static PyObject *
new_request_id(PyObject *counter, PyObject *prefix)
{
    if (Py_IS_TYPE(counter, &IdCounter_Type)) { /* its value in C, no int made */
        unsigned long long v;
        int taken = idcounter_take((IdCounterObject *)counter, &v);
        if (taken < 0) {
            return NULL;
        }
        if (taken) {
            return hex_id(prefix, v);
        }
    }
    return next_request_id(counter, prefix);
}

PyDoc_STRVAR(request_ids_doc,
"request_ids(headers, counter, prefix, /)\n--\n\n"
"(request id, its x-request-id header line): the client's well-formed X-Request-Id among\n"
"``headers`` ((name, value) pairs), else ``prefix`` and next(counter) in 16 hex digits\n"
"(accesslog.request_ids_py).");

/* make_ids' search of ``headers`` for the client's well-formed X-Request-Id when they are what
   the head parser makes, an exact list of exact (bytes, bytes) tuples: nothing here can run
   Python code, so nothing is held while it looks. 1: searched, *rid the client's id (a new
   reference) or NULL; 0: not such headers (nothing done: find_client_id_general looks). */
static int
find_client_id(PyObject *headers, PyObject **rid)
{
    *rid = NULL;
    if (!PyList_CheckExact(headers)) {
        return 0;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(headers); k++) {
        PyObject *pair = PyList_GET_ITEM(headers, k), *name, *value;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return 0;
        }
        name = PyTuple_GET_ITEM(pair, 0);
        value = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
            return 0;
        }
        if (PyBytes_GET_SIZE(name) == 12 && memcmp(PyBytes_AS_STRING(name), "x-request-id", 12) == 0) {
            /* the first x-request-id decides, well formed or not */
            if (valid_client_id((const unsigned char *)PyBytes_AS_STRING(value),
                                PyBytes_GET_SIZE(value))) {
                *rid = Py_NewRef(value);
            }
            return 1;
        }
    }
    return 1;
}

/* find_client_id for any ``headers``: an iterable of (name, value) pairs, as request_ids_py
   unpacks them (any object may stand in for bytes). 0 (*rid a new reference or NULL), or -1
   with an error set. */
static COLD int
find_client_id_general(PyObject *headers, PyObject **rid)
{
    PyObject *seq;
    Py_buffer v;

    *rid = NULL;
    seq = PySequence_Fast(headers, "headers must be iterable");
    if (seq == NULL) {
        return -1;
    }
    /* The size is read again each time round: a name's __eq__ (any object may stand in for
       bytes) could change the list; every item in use is held by a strong reference. */
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
        PyObject *item, *pair, *name, *value;
        int is_id;

        item = Py_NewRef(PySequence_Fast_GET_ITEM(seq, k));
        pair = PySequence_Fast(item, "a header must be a (name, value) pair");
        Py_DECREF(item);
        if (pair == NULL) {
            Py_DECREF(seq);
            return -1;
        }
        if (PySequence_Fast_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_ValueError, "a header has %zd items, not 2",
                         PySequence_Fast_GET_SIZE(pair));
            Py_DECREF(pair);
            Py_DECREF(seq);
            return -1;
        }
        name = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 0));
        value = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 1));
        Py_DECREF(pair);
        if (PyBytes_CheckExact(name)) {
            is_id = PyBytes_GET_SIZE(name) == 12 &&
                    memcmp(PyBytes_AS_STRING(name), "x-request-id", 12) == 0;
        }
        else {
            is_id = PyObject_RichCompareBool(name, bytes_xrid, Py_EQ);
        }
        Py_DECREF(name);
        if (is_id < 0) {
            Py_DECREF(value);
            Py_DECREF(seq);
            return -1;
        }
        if (is_id) {
            int ok;
            if (get_view(value, &v) < 0) {
                Py_DECREF(value);
                Py_DECREF(seq);
                return -1;
            }
            ok = valid_client_id((const unsigned char *)v.buf, v.len);
            PyBuffer_Release(&v);
            if (ok) {
                *rid = value; /* the reference taken above */
            }
            else {
                Py_DECREF(value);
            }
            break; /* the first x-request-id decides, well formed or not */
        }
        Py_DECREF(value);
    }
    Py_DECREF(seq);
    return 0;
}

/* The request id and its header line of request_ids(), as new references in *rid_out and
   *line_out; 0, or -1 with an error set (and nothing in them). */
static int
make_ids(PyObject *headers, PyObject *counter, PyObject *prefix, PyObject **rid_out,
         PyObject **line_out)
{
    PyObject *rid = NULL, *line;
    Py_buffer v;
    char *w;

    *rid_out = *line_out = NULL;
    if (need_bytes(prefix, "prefix")) {
        return -1;
    }
    if (!find_client_id(headers, &rid) && find_client_id_general(headers, &rid) < 0) {
        return -1;
    }
    if (rid == NULL) {
        rid = new_request_id(counter, prefix);
        if (rid == NULL) {
            return -1;
        }
    }
    if (get_view(rid, &v) < 0) {
        Py_DECREF(rid);
        return -1;
    }
    if (v.len > PY_SSIZE_T_MAX - (Py_ssize_t)XRID_PREFIX_LEN - 2) {
        PyBuffer_Release(&v);
        Py_DECREF(rid);
        PyErr_NoMemory();
        return -1;
    }
    line = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)XRID_PREFIX_LEN + v.len + 2);
    if (line == NULL) {
        PyBuffer_Release(&v);
        Py_DECREF(rid);
        return -1;
    }
    w = PyBytes_AS_STRING(line);
    memcpy(w, XRID_PREFIX, XRID_PREFIX_LEN);
    memcpy(w + XRID_PREFIX_LEN, v.buf, (size_t)v.len);
    memcpy(w + XRID_PREFIX_LEN + v.len, "\r\n", 2);
    PyBuffer_Release(&v);
    *rid_out = rid;
    *line_out = line;
    return 0;
}

static PyObject *
request_ids(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *rid, *line, *result;

    if (!check_nargs("request_ids", nargs, 3)) {
        return NULL;
    }
    if (make_ids(args[0], args[1], args[2], &rid, &line) < 0) {
        return NULL;
    }
    result = PyTuple_Pack(2, rid, line);
    Py_DECREF(rid);
    Py_DECREF(line);
    return result;
}

PyDoc_STRVAR(begin_request_doc,
"begin_request(head, counter, prefix, now, requests, framer, /)\n--\n\n"
"A request forwarded: its list as ConnectionLog keeps it (request_ids of head.headers, its\n"
"method, target and start ``now``), appended to ``requests`` and its method to the framer's\n"
"expected ones unless 1024 are waiting (accesslog.begin_request_py).");

#define MAX_WAITING 1024 /* accesslog.ConnectionLog.request, ResponseFramer.expect */

/* framer.expect(method) as begin_request does it: not when unframed (_RAW), nor past 1024
   waiting. 0, or -1 with an error set. */
static int
framer_expect(PyObject *framer, PyObject *method)
{
    PyObject *state, *methods, *done;
    Py_ssize_t waiting;
    int r;

    if ((state = get_slot(framer, &slot_framer_state)) == NULL) {
        return -1;
    }
    r = PyObject_RichCompareBool(state, int_raw, Py_NE);
    Py_DECREF(state);
    if (r <= 0) {
        return r;
    }
    if ((methods = get_slot(framer, &slot_framer_methods)) == NULL) {
        return -1;
    }
    if ((waiting = PyObject_Size(methods)) < 0) {
        Py_DECREF(methods);
        return -1;
    }
    if (waiting < MAX_WAITING) {
        done = append_to(methods, method);
        if (done == NULL) {
            Py_DECREF(methods);
            return -1;
        }
        Py_DECREF(done);
    }
    Py_DECREF(methods);
    return 0;
}

static PyObject *
begin_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *head, *counter, *prefix, *now, *requests, *framer;
    PyObject *headers = NULL, *method = NULL, *target = NULL, *rid = NULL, *line = NULL;
    PyObject *request = NULL;
    Py_ssize_t waiting;

    if (!check_nargs("begin_request", nargs, 6)) {
        return NULL;
    }
    head = args[0];
    counter = args[1];
    prefix = args[2];
    now = args[3];
    requests = args[4];
    framer = args[5];
    if ((headers = get_slot(head, &slot_head_headers)) == NULL ||
        (method = get_slot(head, &slot_head_method)) == NULL ||
        (target = get_slot(head, &slot_head_target)) == NULL ||
        make_ids(headers, counter, prefix, &rid, &line) < 0) {
        goto fail;
    }
    if ((request = PyList_New(R_SIZE)) == NULL) {
        goto fail;
    }
    PyList_SET_ITEM(request, R_METHOD, Py_NewRef(method));
    PyList_SET_ITEM(request, R_TARGET, Py_NewRef(target));
    PyList_SET_ITEM(request, R_ID, Py_NewRef(rid));
    PyList_SET_ITEM(request, R_STARTED, Py_NewRef(now));
    PyList_SET_ITEM(request, R_TTFB, Py_NewRef(Py_None));
    PyList_SET_ITEM(request, R_BODY_IN, Py_NewRef(int_zero));
    PyList_SET_ITEM(request, 6, Py_NewRef(Py_None)); /* the inspection record */
    PyList_SET_ITEM(request, R_ID_LINE, Py_NewRef(line));
    PyList_SET_ITEM(request, R_STATUS, Py_NewRef(int_zero));
    PyList_SET_ITEM(request, R_BODY_OUT, Py_NewRef(int_zero));
    if ((waiting = PyObject_Size(requests)) < 0) {
        goto fail;
    }
    if (waiting < MAX_WAITING) { /* pipelining without reading: stop recording, not grow */
        PyObject *done = append_to(requests, request);
        if (done == NULL) {
            goto fail;
        }
        Py_DECREF(done);
        if (framer_expect(framer, method) < 0) {
            goto fail;
        }
    }
    Py_DECREF(line);
    Py_DECREF(rid);
    Py_DECREF(target);
    Py_DECREF(method);
    Py_DECREF(headers);
    return request;
fail:
    Py_XDECREF(request);
    Py_XDECREF(line);
    Py_XDECREF(rid);
    Py_XDECREF(target);
    Py_XDECREF(method);
    Py_XDECREF(headers);
    return NULL;
}

/* The state list of a ConnectionLog whose lines are text lines (accesslog.ConnectionLog._fast,
   made by ConnectionLog.__init__): the indices read here */
enum {
    S_REQUESTS = 0,   /* deque of request lists */
    S_FRAMER = 1,     /* ResponseFramer */
    S_KEPT = 2,       /* RequestStats.whole (a Tally), or None */
    S_LINES = 3,      /* AccessWriter.lines: [pending, stamp, sec, timer] */
    S_WRITER = 4,     /* AccessWriter (restamp(sec), flush(), arm()) */
    S_LEAD = 5,       /* bytes: the lines' part after the stamp up to the method */
    S_SITE = 6,       /* bytes: " sandbox:port id=" */
    S_SITE_OF = 7,    /* the sandbox id S_SITE was made for */
    S_SITE_PORT = 8,  /* the port S_SITE was made for */
    S_MONO = 9,       /* time.monotonic_ns */
    S_WALL = 10,      /* time.time_ns */
    S_LOG = 11,       /* the tunneld.access logger (isEnabledFor) */
    S_POPLEFT = 12,   /* S_REQUESTS.popleft */
    S_LOG_DICT = 13,  /* S_LOG's instance dict (``disabled``, ``_cache``: info_enabled), or None */
    S_COUNTER = 14,   /* the request ids' counter (log_request) */
    S_PREFIX = 15,    /* the request ids' prefix (log_request) */
    S_INLINE = 16,    /* a Pending (the request in flight held out of S_REQUESTS), or None */
    S_SIZE = 17
};
enum { L_PENDING = 0, L_STAMP = 1, L_SEC = 2, L_TIMER = 3, L_SIZE = 4 };
#define MAX_PENDING 256 /* accesslog._MAX_PENDING */

/* New references to items[0:n] of the list ``lst`` (at least n long) in out[0:n]; -1 with an
   error set (and nothing in out) if it is not such a list. */
static int
items_of(PyObject *lst, Py_ssize_t n, PyObject **out, const char *what)
{
    if (!PyList_Check(lst) || PyList_GET_SIZE(lst) < n) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of at least %zd items", what, n);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        out[k] = Py_NewRef(PyList_GET_ITEM(lst, k));
    }
    return 0;
}

/* items_of for the indices ``which[0:k]`` only (the others stay NULL) */
static int
some_items_of(PyObject *lst, Py_ssize_t n, const int *which, int k, PyObject **out,
              const char *what)
{
    if (!PyList_Check(lst) || PyList_GET_SIZE(lst) < n) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of at least %zd items", what, n);
        return -1;
    }
    for (int j = 0; j < k; j++) {
        out[which[j]] = Py_NewRef(PyList_GET_ITEM(lst, which[j]));
    }
    return 0;
}

static void
clear_items(PyObject **items, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_CLEAR(items[k]);
    }
}

/* clock() when it is time.monotonic_ns or time.time_ns: their clock read here (the same
   clock_gettime as theirs on Linux, without a call through Python), else called */
static PyObject *
clock_ns(PyObject *clock)
{
#ifdef __linux__
    struct timespec ts;
    clockid_t id;
    if (clock == time_monotonic_ns) {
        id = CLOCK_MONOTONIC;
    }
    else if (clock == time_time_ns) {
        id = CLOCK_REALTIME;
    }
    else {
        return PyObject_CallNoArgs(clock);
    }
    if (clock_gettime(id, &ts) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec);
#else
    return PyObject_CallNoArgs(clock);
#endif
}

/* clock() as a long long in *out: 1 (time's clocks read here as clock_ns reads them, or what
   another clock returned, an exact int that fits); 0: what it returned is no such int, *obj
   holds it (a new reference); -1: an error is set. */
static int
clock_ll(PyObject *clock, long long *out, PyObject **obj)
{
    *obj = NULL;
#ifdef __linux__
    if (clock == time_monotonic_ns || clock == time_time_ns) {
        struct timespec ts;
        if (clock_gettime(clock == time_monotonic_ns ? CLOCK_MONOTONIC : CLOCK_REALTIME, &ts)) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        *out = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
        return 1;
    }
#endif
    if ((*obj = PyObject_CallNoArgs(clock)) == NULL) {
        return -1;
    }
    if (exact_ll(*obj, out)) {
        Py_CLEAR(*obj);
        return 1;
    }
    return 0;
}

/* logger.isEnabledFor(INFO) as logging.Logger's does it: False when ``disabled``, else its
   ``_cache`` entry, else the method's answer. ``ldict`` is the logger's instance dict (or None:
   the method is called), taken when its class defines neither name (accesslog._logger_dict), so
   that ``logger.disabled`` and ``logger._cache`` are what the dict holds: two lookups in a dict,
   not the generic getattr (its code is not in the instruction cache of a relay that reads
   attributes through the interpreter's specialized paths: ~15 misses per request). A name
   missing from the dict goes to the method, which does what Python does. 1, 0, or -1 with an
   error set. */
static int
info_enabled(PyObject *logger, PyObject *ldict)
{
    PyObject *r;
    int on;
    if (ldict != Py_None) {
        PyObject *disabled, *cache, *hit;
        if (!PyDict_Check(ldict)) {
            PyErr_SetString(PyExc_TypeError, "the logger's dict must be a dict or None");
            return -1;
        }
        disabled = PyDict_GetItemWithError(ldict, str_disabled); /* borrowed */
        if (disabled == NULL) {
            if (PyErr_Occurred()) {
                return -1;
            }
            goto call;
        }
        if (disabled != Py_False) {
            if (disabled == Py_True) {
                return 0;
            }
            Py_INCREF(disabled); /* IsTrue can run Python code */
            on = PyObject_IsTrue(disabled);
            Py_DECREF(disabled);
            if (on != 0) {
                return on < 0 ? -1 : 0;
            }
        }
        cache = PyDict_GetItemWithError(ldict, str_cache); /* borrowed */
        if (cache == NULL) {
            if (PyErr_Occurred()) {
                return -1;
            }
            goto call;
        }
        if (!PyDict_Check(cache)) {
            goto call; /* what ``self._cache[level]`` does with it: the method's to do */
        }
        hit = PyDict_GetItemWithError(cache, int_info); /* borrowed */
        if (hit == Py_True || hit == Py_False) {
            return hit == Py_True;
        }
        if (hit != NULL) {
            Py_INCREF(hit); /* IsTrue can run Python code */
            on = PyObject_IsTrue(hit);
            Py_DECREF(hit);
            return on;
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
call:
    if ((r = PyObject_CallMethodOneArg(logger, str_is_enabled_for, int_info)) == NULL) {
        return -1;
    }
    on = PyObject_IsTrue(r);
    Py_DECREF(r);
    return on;
}

/* obj.name() and its result dropped; -1 with an error set */
static int
call_method0(PyObject *obj, PyObject *name)
{
    PyObject *r = PyObject_CallMethodNoArgs(obj, name);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* The request in flight of a keep-alive connection, held out of its deque
   ---------------------------------------------------------------------
   Most connections carry one request at a time: a request, its whole response, the next.
   For them the deque of requests, the framer's deque of expected methods and a new request
   list per request are bookkeeping that costs more than the rest of the access log's request
   side (an allocation and a free, four deque operations, the framer's checks, the start as an
   int: ~1,500 instructions a request, docs/performance.md). A Pending (the state's S_INLINE)
   holds such a request instead: log_request puts it there when nothing else is in flight (the
   deque empty, the framer waiting for a head with nothing held or expected) and it is not a
   HEAD, and log_response takes a whole response for it without the framer (which then has
   nothing to frame: it was idle, and only these two touch the pair while the request is
   held). Its list is used again for the next request when nothing else kept it. Any other
   step first puts the request where the general path looks (``spill``: its list into the
   deque, its method into the framer's, as begin_request would have), so the Python code of
   accesslog.ConnectionLog never sees the difference: it calls spill before it reads the deque
   or the framer (``ConnectionLog._spill``). The pure-Python reference keeps no such request
   (its spill does nothing): after a spill the two have the same state. */
typedef struct {
    PyObject_HEAD
    PyObject *req;     /* a request list of R_SIZE items (R_STARTED set by spill), or NULL */
    long long started; /* the clock's ns at the request's head... */
    int started_obj;   /* ...unless it was no int that fits: then R_STARTED holds it */
    int busy;          /* req is the connection's request in flight */
    int idle;          /* the framer was idle when last looked at, and untouched since */
} PendingObject;

static PyTypeObject Pending_Type;

/* GC-tracked: its list holds the head's objects (exact bytes but for a request id found by
   find_client_id_general, which may be anything the headers held) */
static int
pending_traverse(PendingObject *p, visitproc visit, void *arg)
{
    Py_VISIT(p->req);
    return 0;
}

static int
pending_clear(PendingObject *p)
{
    p->busy = 0;
    p->idle = 0;
    Py_CLEAR(p->req);
    return 0;
}

static void
pending_dealloc(PendingObject *p)
{
    PyObject_GC_UnTrack(p);
    pending_clear(p);
    PyObject_GC_Del(p);
}

PyDoc_STRVAR(pending_doc,
"pending()\n--\n\n"
"The holder of a connection's request in flight for log_request and log_response (the\n"
"state's item 16); ``busy`` says whether it holds one (accesslog.ConnectionLog).");

static PyObject *
pending_new(PyObject *module, PyObject *unused)
{
    PendingObject *p = PyObject_GC_New(PendingObject, &Pending_Type);
    if (p == NULL) {
        return NULL;
    }
    p->req = NULL;
    p->started = 0;
    p->started_obj = 0;
    p->busy = 0;
    p->idle = 0;
    PyObject_GC_Track(p);
    return (PyObject *)p;
}

static PyMemberDef pending_members[] = {
    {"busy", T_INT, offsetof(PendingObject, busy), READONLY,
     "1 while it holds the connection's request in flight"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Pending_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunneld._speedups.Pending",
    .tp_basicsize = sizeof(PendingObject),
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A connection's request in flight, held out of its deque (log_request).",
    .tp_traverse = (traverseproc)pending_traverse,
    .tp_clear = (inquiry)pending_clear,
    .tp_members = pending_members,
};

/* The held request into ``requests`` and its method into the framer's, as begin_request puts
   a request (not past 1024 waiting): 0, or -1 with an error set. Nothing when none is held. */
static int
pending_spill(PendingObject *p, PyObject *requests, PyObject *framer)
{
    PyObject *req, *started, *method, *done;
    Py_ssize_t waiting;
    int r = 0;

    p->idle = 0; /* the caller's code goes to the framer next */
    if (!p->busy) {
        return 0;
    }
    started = p->started_obj ? NULL : PyLong_FromLongLong(p->started);
    if (started == NULL && !p->started_obj) {
        return -1;
    }
    /* the holder lets go first: the calls below can run Python code */
    req = p->req; /* its reference moves to this function */
    p->req = NULL;
    p->busy = 0;
    if (started != NULL) {
        Py_SETREF(PyList_GET_ITEM(req, R_STARTED), started); /* R_SIZE items (ours) */
    }
    method = Py_NewRef(PyList_GET_ITEM(req, R_METHOD));
    if ((waiting = PyObject_Size(requests)) < 0) {
        r = -1;
    }
    else if (waiting < MAX_WAITING) {
        if ((done = append_to(requests, req)) == NULL) {
            r = -1;
        }
        else {
            Py_DECREF(done);
            r = framer_expect(framer, method);
        }
    }
    Py_DECREF(method);
    Py_DECREF(req);
    return r;
}

PyDoc_STRVAR(spill_doc,
"spill(state, /)\n--\n\n"
"The request in flight that log_request holds in the state's Pending (item 16) into the\n"
"state's requests and its method into the framer's, where ConnectionLog's Python code looks\n"
"(accesslog.spill_py, which has none to move).");

static PyObject *
spill(PyObject *module, PyObject *state)
{
    PyObject *st[S_SIZE] = {NULL};
    static const int used[] = {S_REQUESTS, S_FRAMER, S_INLINE};
    int r = 0;

    if (some_items_of(state, S_SIZE, used, (int)(sizeof(used) / sizeof(used[0])), st,
                      "state") < 0) {
        return NULL;
    }
    if (Py_IS_TYPE(st[S_INLINE], &Pending_Type)) {
        r = pending_spill((PendingObject *)st[S_INLINE], st[S_REQUESTS], st[S_FRAMER]);
    }
    clear_items(st, S_SIZE);
    if (r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* 1: ``framer`` waits for a head, holds nothing and expects nothing; 0: not; -1: an error */
static int
framer_idle(PyObject *framer)
{
    PyObject *v;
    int r;

    if ((v = get_slot(framer, &slot_framer_state)) == NULL) {
        return -1;
    }
    r = v == int_zero ? 1 : PyObject_RichCompareBool(v, int_zero, Py_EQ);
    Py_DECREF(v);
    if (r <= 0) {
        return r;
    }
    if ((v = get_slot(framer, &slot_framer_buf)) == NULL) {
        return -1;
    }
    r = PyByteArray_CheckExact(v) ? PyByteArray_GET_SIZE(v) != 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    if (r != 0) {
        return r < 0 ? -1 : 0;
    }
    if ((v = get_slot(framer, &slot_framer_methods)) == NULL) {
        return -1;
    }
    r = Py_TYPE(v) == (PyTypeObject *)deque_type ? Py_SIZE(v) != 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    return r < 0 ? -1 : !r;
}

/* list[i] = v (a new reference), the old item dropped (ours: bytes, ints or None) */
static void
put_item(PyObject *list, Py_ssize_t i, PyObject *v)
{
    PyObject *old = PyList_GET_ITEM(list, i);
    PyList_SET_ITEM(list, i, v);
    Py_XDECREF(old);
}

/* log_request's common case: ``head`` becomes the Pending's request when nothing else is in
   flight (``st``: the state's items, S_REQUESTS, S_FRAMER, S_MONO, S_COUNTER and S_PREFIX
   among them). 1: held (its id line is the list's R_ID_LINE); 0: not (nothing read but the
   head's attributes, nothing changed: begin_request does it all again); -1: an error is set.
   Every check that can say no comes before make_ids, which takes a value of the counter. */
static int
pending_begin(PendingObject *p, PyObject *head, PyObject **st)
{
    PyObject *headers = NULL, *method = NULL, *target = NULL, *rid = NULL, *line = NULL;
    PyObject *req, *started = NULL;
    long long now = 0;
    int r;

    if (Py_TYPE(st[S_REQUESTS]) != (PyTypeObject *)deque_type || Py_SIZE(st[S_REQUESTS]) != 0) {
        return 0;
    }
    /* The framer's state is read once: it stays idle while only the Pending's requests and
       their whole responses pass (pending_take does not feed it); every other way to it
       clears ``idle`` first (spill, and the deque's ways of log_request and log_response). */
    if (!p->idle) {
        if ((r = framer_idle(st[S_FRAMER])) <= 0) {
            return r;
        }
        p->idle = 1;
    }
    /* begin_request's reads, in its order (the same errors) */
    if ((headers = get_slot(head, &slot_head_headers)) == NULL ||
        (method = get_slot(head, &slot_head_method)) == NULL ||
        (target = get_slot(head, &slot_head_target)) == NULL) {
        r = -1;
        goto done;
    }
    if (!PyBytes_CheckExact(method) || !PyBytes_CheckExact(target) ||
        (PyBytes_GET_SIZE(method) == 4 && memcmp(PyBytes_AS_STRING(method), "HEAD", 4) == 0)) {
        r = 0; /* a HEAD's response has no body: the framer's to follow */
        goto done;
    }
    /* the clock, then the ids, as begin_request has them: from here on it is held */
    if (clock_ll(st[S_MONO], &now, &started) < 0 ||
        make_ids(headers, st[S_COUNTER], st[S_PREFIX], &rid, &line) < 0) {
        r = -1;
        goto done;
    }
    req = p->req;
    if (req == NULL || Py_REFCNT(req) != 1 || !PyList_CheckExact(req) ||
        PyList_GET_SIZE(req) != R_SIZE) {
        if ((req = PyList_New(R_SIZE)) == NULL) {
            r = -1;
            goto done;
        }
        for (Py_ssize_t k = 0; k < R_SIZE; k++) {
            PyList_SET_ITEM(req, k, Py_NewRef(Py_None));
        }
        Py_XSETREF(p->req, req);
    }
    /* held while it is filled: an old item dropped below could be an object whose __del__
       runs Python code that comes back here and lets go of p->req */
    Py_INCREF(req);
    /* begin_request's list: method, target, id, started (spill sets it), ttfb None, body_in 0,
       no record, id line, status and body_out 0 */
    put_item(req, R_METHOD, Py_NewRef(method));
    put_item(req, R_TARGET, Py_NewRef(target));
    put_item(req, R_ID, Py_NewRef(rid));
    if (started != NULL || PyList_GET_ITEM(req, R_STARTED) != Py_None) {
        put_item(req, R_STARTED, Py_NewRef(started != NULL ? started : Py_None));
    }
    if (PyList_GET_ITEM(req, R_TTFB) != Py_None) {
        put_item(req, R_TTFB, Py_NewRef(Py_None));
    }
    if (PyList_GET_ITEM(req, R_BODY_IN) != int_zero) {
        put_item(req, R_BODY_IN, Py_NewRef(int_zero));
    }
    put_item(req, R_ID_LINE, Py_NewRef(line));
    if (PyList_GET_ITEM(req, R_STATUS) != int_zero) {
        put_item(req, R_STATUS, Py_NewRef(int_zero));
    }
    if (PyList_GET_ITEM(req, R_BODY_OUT) != int_zero) {
        put_item(req, R_BODY_OUT, Py_NewRef(int_zero));
    }
    p->started = now;
    p->started_obj = started != NULL;
    p->busy = 1;
    r = 1;
    Py_DECREF(req);
done:
    Py_XDECREF(started);
    Py_XDECREF(headers);
    Py_XDECREF(method);
    Py_XDECREF(target);
    Py_XDECREF(rid);
    Py_XDECREF(line);
    return r;
}

/* log_response's common case: ``data`` is a whole response of the common kind for the
   Pending's request (whole_native's checks, but the framer's: it is idle), ``now`` the clock's
   value in C (NULL: it was no int that fits). 1: taken, *out the bytes for the client, *n its
   numbers, counted in the state's Tally, the request no longer held (its list, with a new
   reference in *req, is the text line's); 0: not taken, the request spilled to the deque
   first (log_response goes on as before, with the clock already read); -1: an error is set. */
static int
pending_take(PendingObject *p, PyObject **st, PyObject *data, const long long *now,
             PyObject **out, PyObject **req, whole_numbers *n)
{
    PyObject *line = PyList_GET_ITEM(p->req, R_ID_LINE);
    Py_buffer view, idv;
    Py_ssize_t end = 0;
    int ok;

    *out = *req = NULL;
    if (now != NULL && !p->started_obj && PyBytes_CheckExact(line) &&
        (st[S_KEPT] == Py_None || Py_IS_TYPE(st[S_KEPT], &Tally_Type))) {
        if (!PyBytes_CheckExact(data)) {
            return pending_spill(p, st[S_REQUESTS], st[S_FRAMER]); /* what tunneld never sends */
        }
        get_view(data, &view); /* exact bytes: no export, no Python code, cannot fail */
        ok = simple_response((const unsigned char *)view.buf, view.len, &n->status, &end) &&
             !__builtin_sub_overflow(*now, p->started, &n->ns) && n->ns >= 0 &&
             n->ns < (1LL << 53);
        if (ok) {
            idv.buf = PyBytes_AS_STRING(line); /* exact bytes: no Python code runs */
            idv.len = PyBytes_GET_SIZE(line);
            *out = with_id_line(&view, end, &idv, 1);
            n->body_in = 0; /* a request with a body was spilled (ConnectionLog.body) */
            n->body_out = view.len - end;
            PyBuffer_Release(&view);
            if (*out == NULL ||
                (st[S_KEPT] != Py_None &&
                 tally_observe_ll((TallyObject *)st[S_KEPT], n->ns, n->status, 0,
                                  n->body_out) < 0)) {
                Py_CLEAR(*out);
                return -1;
            }
            p->busy = 0;
            *req = Py_NewRef(p->req);
            return 1;
        }
        PyBuffer_Release(&view);
    }
    return pending_spill(p, st[S_REQUESTS], st[S_FRAMER]);
}

PyDoc_STRVAR(log_response_doc,
"log_response(state, conn, data, /)\n--\n\n"
"ConnectionLog.response's step for a whole response on a connection that writes text lines:\n"
"whole_response of its oldest request (counted in the state's Tally), which then leaves the\n"
"queue, and when the access logger logs info its text line (text_line, the\n"
"writer restamped on a new second) with the writer's flush or timer. Returns the bytes for\n"
"the client, or None when whole_response takes nothing (accesslog.log_response_py).");

/* log_response's general way to the bytes: whole_response on the objects (``*now`` made from
   now_ns when it is NULL) */
static COLD PyObject *
whole_general(PyObject *module, PyObject **st, PyObject *data, PyObject *request,
              PyObject **now, long long now_ns)
{
    PyObject *call[5];
    if (*now == NULL && (*now = PyLong_FromLongLong(now_ns)) == NULL) {
        return NULL;
    }
    call[0] = st[S_FRAMER];
    call[1] = data;
    call[2] = request;
    call[3] = *now;
    call[4] = st[S_KEPT];
    return whole_response(module, call, 5);
}

/* log_response's general way to the text line: text_line on the objects (``*wall`` made from
   wall_ns when it is NULL), the request's numbers first set as whole_response sets them when
   whole_native found them (``*native`` is then cleared). The count, or -2 with an error set. */
static COLD Py_ssize_t
line_general(PyObject *module, PyObject **ln, PyObject *lead, PyObject *request,
             PyObject *site, PyObject **wall, long long wall_ns, int *native,
             const whole_numbers *n)
{
    PyObject *call[7], *r;
    Py_ssize_t count;
    if (*native) {
        PyObject *a = PyLong_FromLongLong(n->ns), *b = PyLong_FromLong(n->status);
        PyObject *c = PyLong_FromLongLong(n->body_out);
        int bad = a == NULL || b == NULL || c == NULL ||
                  PyList_SetItem(request, R_TTFB, Py_NewRef(a)) < 0 ||
                  PyList_SetItem(request, R_STATUS, Py_NewRef(b)) < 0 ||
                  PyList_SetItem(request, R_BODY_OUT, Py_NewRef(c)) < 0;
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        if (bad) {
            return -2;
        }
        *native = 0;
    }
    if (*wall == NULL && (*wall = PyLong_FromLongLong(wall_ns)) == NULL) {
        return -2;
    }
    call[0] = ln[L_PENDING];
    call[1] = ln[L_STAMP];
    call[2] = ln[L_SEC];
    call[3] = *wall;
    call[4] = lead;
    call[5] = request;
    call[6] = site;
    if ((r = text_line(module, call, 7)) == NULL) {
        return -2;
    }
    count = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    return (count == -1 && PyErr_Occurred()) ? -2 : count;
}

/* writer.restamp(wall // 10**9): a new second. 0, or -1 with an error set. */
static COLD int
restamp(PyObject *writer, PyObject *wall, long long wall_ns)
{
    PyObject *sec, *r;
    if (wall != NULL) {
        sec = PyNumber_FloorDivide(wall, int_1e9);
    }
    else {
        sec = PyLong_FromLongLong(wall_ns / 1000000000LL); /* >= 0: floor */
    }
    if (sec == NULL) {
        return -1;
    }
    r = PyObject_CallMethodOneArg(writer, str_restamp, sec);
    Py_DECREF(sec);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* conn._resite() and the state's new site (a new reference), or NULL with an error set */
static COLD PyObject *
resite(PyObject *state, PyObject *conn)
{
    PyObject *fresh[S_SIZE] = {NULL}, *site;
    if (call_method0(conn, str_resite) < 0 || items_of(state, S_SIZE, fresh, "state") < 0) {
        return NULL;
    }
    site = Py_NewRef(fresh[S_SITE]);
    clear_items(fresh, S_SIZE);
    return site;
}

static PyObject *
log_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *st[S_SIZE] = {NULL}, *ln[L_SIZE] = {NULL};
    PyObject *conn, *data, *request = NULL, *now = NULL, *out = NULL, *r = NULL;
    PyObject *sid = NULL, *port = NULL, *wall = NULL, *site = NULL;
    Py_ssize_t waiting, count;
    long long now_ns = 0, wall_ns = 0, sec_ns;
    whole_numbers n = {0, 0, 0, 0};
    int on = 0, native = 0, have_wall, clock_read = 0;

    if (!check_nargs("log_response", nargs, 3)) {
        return NULL;
    }
    conn = args[1];
    data = args[2];
    /* strong references to everything used: the calls below can run Python code */
    if (items_of(args[0], S_SIZE, st, "state") < 0) {
        return NULL;
    }
    if (Py_IS_TYPE(st[S_INLINE], &Pending_Type) && ((PendingObject *)st[S_INLINE])->busy) {
        /* the clock read once, here: the deque's way below uses it if this does not take */
        if ((on = clock_ll(st[S_MONO], &now_ns, &now)) < 0) {
            goto fail;
        }
        clock_read = 1;
        native = pending_take((PendingObject *)st[S_INLINE], st, data, on ? &now_ns : NULL,
                              &out, &request, &n);
        if (native < 0) {
            goto fail;
        }
        if (native == 1) {
            goto taken; /* not in the deque: nothing to pop */
        }
        /* spilled: the deque's way below */
    }
    if (Py_IS_TYPE(st[S_INLINE], &Pending_Type)) {
        ((PendingObject *)st[S_INLINE])->idle = 0; /* the deque's way goes to the framer */
    }
    if ((waiting = PyObject_Size(st[S_REQUESTS])) < 0) {
        goto fail;
    }
    if (waiting == 0) {
        clear_items(st, S_SIZE);
        Py_XDECREF(now);
        Py_RETURN_NONE;
    }
    if ((request = PySequence_GetItem(st[S_REQUESTS], 0)) == NULL ||
        (!clock_read && (on = clock_ll(st[S_MONO], &now_ns, &now)) < 0)) {
        goto fail;
    }
    /* The common case on numbers held in C (whole_native): no int objects made or read back */
    if (on == 1 && PyList_CheckExact(request) &&
        (st[S_KEPT] == Py_None || Py_IS_TYPE(st[S_KEPT], &Tally_Type))) {
        native = whole_native(st[S_FRAMER], data, request, now_ns, st[S_KEPT], &out, &n);
        if (native < 0) {
            goto fail;
        }
        if (native == 0) {
            out = Py_NewRef(Py_None);
            goto done;
        }
        native = native == 1;
    }
    if (!native) {
        if ((out = whole_general(module, st, data, request, &now, now_ns)) == NULL) {
            goto fail;
        }
        if (out == Py_None) {
            goto done; /* not a whole response: the general path */
        }
    }
    if ((r = PyObject_CallNoArgs(st[S_POPLEFT])) == NULL) {
        goto fail;
    }
    Py_CLEAR(r);
taken:
    on = info_enabled(st[S_LOG], st[S_LOG_DICT]);
    if (on <= 0) {
        if (on < 0) {
            goto fail;
        }
        goto done;
    }
    /* the line's " sandbox:port id=", made again by conn._resite() when either changed */
    if ((sid = get_slot(conn, &slot_conn_sandbox_id)) == NULL ||
        (port = get_slot(conn, &slot_conn_port)) == NULL) {
        goto fail;
    }
    on = sid != st[S_SITE_OF] ? 1 : PyObject_RichCompareBool(port, st[S_SITE_PORT], Py_NE);
    if (on < 0) {
        goto fail;
    }
    site = on ? resite(args[0], conn) : Py_NewRef(st[S_SITE]);
    if (site == NULL || (have_wall = clock_ll(st[S_WALL], &wall_ns, &wall)) < 0) {
        goto fail;
    }
    have_wall = have_wall == 1 && wall_ns >= 0;
    for (int restamped = 0;; restamped = 1) {
        if (items_of(st[S_LINES], L_SIZE, ln, "lines") < 0) {
            goto fail;
        }
        if (native && have_wall && exact_ll(ln[L_SEC], &sec_ns)) {
            /* text_line on the numbers whole_native found; body_in as the request has it now
               (the calls above can run Python code) */
            if (line_objects(ln[L_PENDING], ln[L_STAMP], st[S_LEAD], request, site) < 0 ||
                (n.body_in = non_negative(PyList_GET_ITEM(request, R_BODY_IN), "body_in")) < 0) {
                goto fail;
            }
            count = put_line(ln[L_PENDING], ln[L_STAMP], sec_ns, wall_ns, st[S_LEAD], request,
                             site, n.status, n.body_in, n.body_out, n.ns);
        }
        else {
            count = line_general(module, ln, st[S_LEAD], request, site, &wall, wall_ns, &native,
                                 &n);
        }
        if (count == -2) {
            goto fail;
        }
        if (count >= 0 || restamped) {
            break;
        }
        /* a new second: its stamp, then the line again (once) */
        if (restamp(st[S_WRITER], wall, wall_ns) < 0) {
            goto fail;
        }
        clear_items(ln, L_SIZE);
    }
    if (count >= MAX_PENDING) {
        if (call_method0(st[S_WRITER], str_flush) < 0) {
            goto fail;
        }
    }
    else if (ln[L_TIMER] == Py_None && call_method0(st[S_WRITER], str_arm) < 0) {
        goto fail;
    }
done:
    clear_items(st, S_SIZE);
    clear_items(ln, L_SIZE);
    Py_XDECREF(request);
    Py_XDECREF(now);
    Py_XDECREF(sid);
    Py_XDECREF(port);
    Py_XDECREF(site);
    Py_XDECREF(wall);
    return out;
fail:
    Py_CLEAR(out);
    goto done;
}

PyDoc_STRVAR(log_request_doc,
"log_request(state, head, /)\n--\n\n"
"ConnectionLog.request for a connection with log_response's ``state``: begin_request of\n"
"``head`` with the state's counter, prefix, monotonic clock, requests and framer; returns the\n"
"x-request-id line the request carries (accesslog.log_request_py).");

static PyObject *
log_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *st[S_SIZE] = {NULL};
    PyObject *call[6], *now = NULL, *request = NULL, *line = NULL;

    static const int used[] = {S_MONO, S_COUNTER, S_PREFIX, S_REQUESTS, S_FRAMER, S_INLINE};

    if (!check_nargs("log_request", nargs, 2)) {
        return NULL;
    }
    if (some_items_of(args[0], S_SIZE, used, (int)(sizeof(used) / sizeof(used[0])), st,
                      "state") < 0) {
        return NULL;
    }
    if (Py_IS_TYPE(st[S_INLINE], &Pending_Type)) {
        /* one request in flight: held in the Pending (pending_begin); a second one: the
           first goes to the deque, in order, before it */
        PendingObject *p = (PendingObject *)st[S_INLINE];
        int r = p->busy ? pending_spill(p, st[S_REQUESTS], st[S_FRAMER])
                        : pending_begin(p, args[1], st);
        if (r < 0) {
            goto done;
        }
        if (r == 1) {
            line = Py_NewRef(PyList_GET_ITEM(p->req, R_ID_LINE));
            goto done;
        }
        p->idle = 0; /* begin_request below goes to the framer */
    }
    if ((now = clock_ns(st[S_MONO])) == NULL) {
        goto done;
    }
    call[0] = args[1];
    call[1] = st[S_COUNTER];
    call[2] = st[S_PREFIX];
    call[3] = now;
    call[4] = st[S_REQUESTS];
    call[5] = st[S_FRAMER];
    if ((request = begin_request(module, call, 6)) == NULL) {
        goto done;
    }
    /* begin_request made the list: R_SIZE items, the id line bytes */
    line = Py_NewRef(PyList_GET_ITEM(request, R_ID_LINE));
done:
    clear_items(st, S_SIZE);
    Py_XDECREF(now);
    Py_XDECREF(request);
    return line;
}

static PyMethodDef speedups_methods[] = {
    {"simple_head", (PyCFunction)simple_head, METH_O, simple_head_doc},
    {"whole_response", (PyCFunction)(void (*)(void))whole_response, METH_FASTCALL,
     whole_response_doc},
    {"text_line", (PyCFunction)(void (*)(void))text_line, METH_FASTCALL, text_line_doc},
    {"request_ids", (PyCFunction)(void (*)(void))request_ids, METH_FASTCALL, request_ids_doc},
    {"begin_request", (PyCFunction)(void (*)(void))begin_request, METH_FASTCALL,
     begin_request_doc},
    {"log_response", (PyCFunction)(void (*)(void))log_response, METH_FASTCALL,
     log_response_doc},
    {"log_request", (PyCFunction)(void (*)(void))log_request, METH_FASTCALL, log_request_doc},
    {"tally", (PyCFunction)tally_new, METH_O, tally_doc},
    {"id_counter", (PyCFunction)id_counter_new, METH_O, id_counter_doc},
    {"pending", (PyCFunction)pending_new, METH_NOARGS, pending_doc},
    {"spill", (PyCFunction)spill, METH_O, spill_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "tunneld._speedups",
    "C versions of the access log's per-request work (tunneld/speedups.py).",
    -1,
    speedups_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    const char *tchar = "!#$%&'*+-.^_`|~";
    const char *idchar = "._:-";

    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        is_token[c] = (unsigned char)(alnum || (c && strchr(tchar, c) != NULL));
        is_id_char[c] = (unsigned char)(alnum || (c && strchr(idchar, c) != NULL));
        HEX_PAIRS[2 * c] = "0123456789abcdef"[c >> 4];
        HEX_PAIRS[2 * c + 1] = "0123456789abcdef"[c & 0xF];
    }
    if (str_state == NULL) {
        str_state = PyUnicode_InternFromString("_state");
        str_buf = PyUnicode_InternFromString("_buf");
        str_methods = PyUnicode_InternFromString("_methods");
        str_popleft = PyUnicode_InternFromString("popleft");
        bytes_head = PyBytes_FromString("HEAD");
        bytes_xrid = PyBytes_FromString("x-request-id");
        bytes_hex16 = PyBytes_FromString("%016x");
        int_zero = PyLong_FromLong(0);
        float_1e9 = PyFloat_FromDouble(1e9);
        int_raw = PyLong_FromLong(4);
        str_headers = PyUnicode_InternFromString("headers");
        str_method = PyUnicode_InternFromString("method");
        str_target = PyUnicode_InternFromString("target");
        str_append = PyUnicode_InternFromString("append");
        str_is_enabled_for = PyUnicode_InternFromString("isEnabledFor");
        str_sandbox_id = PyUnicode_InternFromString("sandbox_id");
        str_port = PyUnicode_InternFromString("port");
        str_resite = PyUnicode_InternFromString("_resite");
        str_restamp = PyUnicode_InternFromString("restamp");
        str_flush = PyUnicode_InternFromString("flush");
        str_arm = PyUnicode_InternFromString("arm");
        int_info = PyLong_FromLong(20); /* logging.INFO */
        int_1e9 = PyLong_FromLong(1000000000L);
        str_disabled = PyUnicode_InternFromString("disabled");
        str_cache = PyUnicode_InternFromString("_cache");
        {
            PyObject *time_module = PyImport_ImportModule("time");
            if (time_module == NULL) {
                return NULL;
            }
            time_monotonic_ns = PyObject_GetAttrString(time_module, "monotonic_ns");
            time_time_ns = PyObject_GetAttrString(time_module, "time_ns");
            Py_DECREF(time_module);
        }
        if (!str_disabled || !str_cache || !time_monotonic_ns || !time_time_ns) {
            return NULL;
        }
        if (!str_is_enabled_for || !str_sandbox_id || !str_port || !str_resite ||
            !str_restamp || !str_flush || !str_arm || !int_info || !int_1e9) {
            return NULL;
        }
        if (!int_zero || !float_1e9 || !int_raw || !str_headers || !str_method || !str_target ||
            !str_append || !str_state || !str_buf || !str_methods || !str_popleft || !bytes_head ||
            !bytes_xrid || !bytes_hex16) {
            return NULL;
        }
        {
            PyObject *collections = PyImport_ImportModule("collections");
            if (collections == NULL) {
                return NULL;
            }
            deque_type = PyObject_GetAttrString(collections, "deque");
            Py_DECREF(collections);
            if (deque_type == NULL) {
                return NULL;
            }
            deque_append = PyObject_GetAttrString(deque_type, "append");
            deque_popleft = PyObject_GetAttrString(deque_type, "popleft");
            if (deque_append == NULL || deque_popleft == NULL || !PyType_Check(deque_type)) {
                return NULL;
            }
        }
        slot_framer_state.name = str_state;
        slot_framer_buf.name = str_buf;
        slot_framer_methods.name = str_methods;
        slot_head_headers.name = str_headers;
        slot_head_method.name = str_method;
        slot_head_target.name = str_target;
        slot_conn_sandbox_id.name = str_sandbox_id;
        slot_conn_port.name = str_port;
    }
    if (PyType_Ready(&Tally_Type) < 0 || PyType_Ready(&IdCounter_Type) < 0 ||
        PyType_Ready(&Pending_Type) < 0) {
        return NULL;
    }
    return PyModule_Create(&speedups_module);
}
