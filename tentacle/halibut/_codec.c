/*
 * The compiled core of the Halibut codec: an accelerator, never an authority.
 *
 * Every entry point either returns exactly what the pure-Python code in
 * bson.py / serializer.py returns for the same input, or returns None to
 * say "not here": then the caller runs the pure-Python code, which produces
 * the result or the precise error.  So errors, their types and their
 * messages only ever come from Python, and this file only has to be right
 * on the paths it accepts.  Anything unusual (a subclass, a missing field,
 * a case-folded member name, bad input of any kind) is declined.
 *
 * Entry points (see tentacle/halibut/accel.py, which loads this module):
 *
 *   configure_values(...), configure_objects(...)
 *                                      the Python objects the core needs
 *   encode_document(doc, max_depth)    -> bytes | None
 *   decode_document(data, max_message_bytes, max_depth, max_string_bytes)
 *                                      -> dict | None
 *   encode_message(message, max_depth) -> (bytes, [DataStream]) | None
 *   decode_envelope(tree, names, expected, run_validators)
 *                                      -> (message | None, [DataStream]) | None
 *
 * The object layer is driven by "plans": tuples that serializer.py compiles
 * once per class from its wire schema (see _plan_for there).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

#ifndef TENTACLE_CODEC_SOURCE
#define TENTACLE_CODEC_SOURCE ""
#endif

#define B_DOUBLE 0x01
#define B_STRING 0x02
#define B_DOCUMENT 0x03
#define B_ARRAY 0x04
#define B_BINARY 0x05
#define B_BOOLEAN 0x08
#define B_DATETIME 0x09
#define B_NULL 0x0A
#define B_INT32 0x10
#define B_INT64 0x12

/* Wire type tags of a plan's field specs; serializer.py uses the same. */
enum {
    T_STRING = 0,
    T_BOOLEAN = 1,
    T_INT32 = 2,
    T_INT64 = 3,
    T_GUID = 4,
    T_TIMESPAN = 5,
    T_DATETIMEOFFSET = 6,
    T_OBJECT = 7,
    T_RAW = 8,
    T_ENUM = 9,
    T_NULLABLE = 10,
    T_LIST = 11,
    T_ENUMDICT = 12,
    T_COMPLEX = 13,
    T_UNSUPPORTED = 14,
};

/* How a class is built when decoding: by calling it, or slot by slot. */
enum { C_CALL = 0, C_SLOTS = 1 };

/* Both directions recurse; deeper than this they decline, whatever the
 * configured limit, so a thread's small C stack is never at risk. */
#define MAX_C_DEPTH 128

#define TICKS_PER_SECOND 10000000LL
#define TICKS_PER_MINUTE (60 * TICKS_PER_SECOND)
#define TICKS_PER_HOUR (60 * TICKS_PER_MINUTE)
#define TICKS_PER_DAY (24 * TICKS_PER_HOUR)

/* --- configured objects ------------------------------------------------- */

static int values_configured = 0;
static int objects_configured = 0;
static PyObject *g_int64;          /* tentacle.halibut.bson.Int64 */
static PyObject *g_uuid;           /* uuid.UUID */
static PyObject *g_uuid_int;       /* its 'int' slot descriptor, or NULL */
static PyObject *g_uuid_is_safe;   /* its 'is_safe' slot descriptor, or NULL */
static PyObject *g_safe_unknown;   /* uuid.SafeUUID.unknown */
static PyObject *g_utc;            /* datetime.timezone.utc */
static PyObject *g_int_enum;       /* enum.IntEnum */
static PyObject *g_timespan;       /* tentacle.halibut.dotnet.TimeSpan */
static PyObject *g_timespan_ticks; /* its 'ticks' slot descriptor */
static PyObject *g_timespan_parse; /* TimeSpan.parse */
static PyObject *g_require_aware;  /* serializer.require_aware, done natively */
static PyObject *g_datastream;     /* serializer.DataStream */
static PyObject *g_request;        /* serializer.RequestMessage */
static PyObject *g_response;       /* serializer.ResponseMessage */
static PyObject *g_plans;          /* dict: class -> plan */
static PyObject *g_plan_for;       /* callable(class) -> plan | None */

static PyObject *s_utcoffset;
static PyObject *s_message;
static PyObject *s_type;
static PyObject *g_empty_tuple;

/* --- declining ------------------------------------------------------------
 *
 * Internal functions return -1 (or NULL) to decline, with or without a
 * Python exception set.  At the entry points an Exception is cleared and
 * None returned; a BaseException that is not an Exception (KeyboardInterrupt,
 * SystemExit) propagates.
 */

static PyObject *
decline(void)
{
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return NULL;
        }
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

/* --- output buffer ------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int
buf_grow(Buf *b, Py_ssize_t need)
{
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    if (need > PY_SSIZE_T_MAX - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    while (cap < b->len + need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(b->data, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

#define NEED(b, n)                                                        \
    do {                                                                  \
        if ((b)->len + (Py_ssize_t)(n) > (b)->cap && buf_grow((b), (n)) < 0) \
            return -1;                                                    \
    } while (0)

static inline void
put_u8(Buf *b, unsigned v)
{
    b->data[b->len++] = (char)(v & 0xff);
}

static inline void
store_u32(char *p, uint32_t v)
{
    p[0] = (char)(v & 0xff);
    p[1] = (char)((v >> 8) & 0xff);
    p[2] = (char)((v >> 16) & 0xff);
    p[3] = (char)((v >> 24) & 0xff);
}

static inline void
put_i32(Buf *b, int32_t v)
{
    store_u32(b->data + b->len, (uint32_t)v);
    b->len += 4;
}

static inline void
put_i64(Buf *b, int64_t v)
{
    uint64_t u = (uint64_t)v;
    store_u32(b->data + b->len, (uint32_t)(u & 0xffffffffu));
    store_u32(b->data + b->len + 4, (uint32_t)(u >> 32));
    b->len += 8;
}

static inline void
put_bytes(Buf *b, const char *p, Py_ssize_t n)
{
    memcpy(b->data + b->len, p, (size_t)n);
    b->len += n;
}

/* Element header: type byte and key (given without its NUL). */
static int
put_header(Buf *b, unsigned kind, const char *key, Py_ssize_t klen)
{
    NEED(b, klen + 2);
    put_u8(b, kind);
    put_bytes(b, key, klen);
    put_u8(b, 0);
    return 0;
}

/* A container starts with a length patched in by close_container. */
static int
open_container(Buf *b, Py_ssize_t *start)
{
    NEED(b, 4);
    *start = b->len;
    b->len += 4;
    return 0;
}

static int
close_container(Buf *b, Py_ssize_t start)
{
    NEED(b, 1);
    put_u8(b, 0);
    Py_ssize_t size = b->len - start;
    if (size > INT32_MAX) {
        return -1; /* Python raises "BSON document too large" */
    }
    store_u32(b->data + start, (uint32_t)size);
    return 0;
}

/* --- UTF-8 of str objects ------------------------------------------------- */

typedef struct {
    const char *p;
    Py_ssize_t n;
    PyObject *owner; /* a bytes object to release, or NULL */
} Utf8;

/* Exact str only; lone surrogates decline (Python raises). */
static int
utf8_of(PyObject *s, Utf8 *out)
{
    if (!PyUnicode_CheckExact(s)) {
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0) {
        return -1;
    }
#endif
    if (PyUnicode_IS_ASCII(s)) {
        out->p = (const char *)PyUnicode_DATA(s);
        out->n = PyUnicode_GET_LENGTH(s);
        out->owner = NULL;
        return 0;
    }
    /* Not PyUnicode_AsUTF8AndSize: that caches a copy inside the string. */
    PyObject *bytes = PyUnicode_AsUTF8String(s);
    if (bytes == NULL) {
        return -1;
    }
    out->p = PyBytes_AS_STRING(bytes);
    out->n = PyBytes_GET_SIZE(bytes);
    out->owner = bytes;
    return 0;
}

static int
put_string_value(Buf *b, PyObject *s)
{
    Utf8 u;
    if (utf8_of(s, &u) < 0) {
        return -1;
    }
    if (u.n + 1 > INT32_MAX) {
        Py_XDECREF(u.owner);
        return -1;
    }
    if (b->len + u.n + 5 > b->cap && buf_grow(b, u.n + 5) < 0) {
        Py_XDECREF(u.owner);
        return -1;
    }
    put_i32(b, (int32_t)(u.n + 1));
    put_bytes(b, u.p, u.n);
    put_u8(b, 0);
    Py_XDECREF(u.owner);
    return 0;
}

static int
put_string_element(Buf *b, const char *key, Py_ssize_t klen, PyObject *s)
{
    if (put_header(b, B_STRING, key, klen) < 0) {
        return -1;
    }
    return put_string_value(b, s);
}

/* --- integers ------------------------------------------------------------- */

/*
 * The value of an int that the pure code treats as a plain integer: an
 * exact int, an Int64, or an IntEnum member.  Other int subclasses and
 * values beyond Int64 decline.
 */
static int
int_value(PyObject *v, long long *out)
{
    if (!PyLong_CheckExact(v) && Py_TYPE(v) != (PyTypeObject *)g_int64) {
        if (!PyLong_Check(v) || PyBool_Check(v)) {
            return -1;
        }
        int is_enum = PyObject_IsInstance(v, g_int_enum);
        if (is_enum <= 0) {
            return -1;
        }
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (value == -1 && PyErr_Occurred())) {
        return -1;
    }
    *out = value;
    return 0;
}

/* An int in a plain-int position: int32 when it fits, else int64. */
static int
put_int_element(Buf *b, const char *key, Py_ssize_t klen, long long value)
{
    if (value >= INT32_MIN && value <= INT32_MAX) {
        if (put_header(b, B_INT32, key, klen) < 0) {
            return -1;
        }
        NEED(b, 4);
        put_i32(b, (int32_t)value);
        return 0;
    }
    if (put_header(b, B_INT64, key, klen) < 0) {
        return -1;
    }
    NEED(b, 8);
    put_i64(b, (int64_t)value);
    return 0;
}

static int
put_int64_element(Buf *b, const char *key, Py_ssize_t klen, long long value)
{
    if (put_header(b, B_INT64, key, klen) < 0) {
        return -1;
    }
    NEED(b, 8);
    put_i64(b, (int64_t)value);
    return 0;
}

/* --- Guid ------------------------------------------------------------------ */

/* The 16 bytes of Guid.ToByteArray() (uuid's bytes_le) for an exact UUID. */
static int
guid_bytes(PyObject *value, unsigned char out[16])
{
    PyObject *number = PyObject_GetAttrString(value, "int");
    if (number == NULL) {
        return -1;
    }
    if (!PyLong_CheckExact(number)) {
        Py_DECREF(number);
        return -1;
    }
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(number);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) {
        Py_DECREF(number);
        return -1;
    }
    PyObject *sixty_four = PyLong_FromLong(64);
    if (sixty_four == NULL) {
        Py_DECREF(number);
        return -1;
    }
    PyObject *high = PyNumber_Rshift(number, sixty_four);
    Py_DECREF(sixty_four);
    Py_DECREF(number);
    if (high == NULL) {
        return -1;
    }
    int overflow = 0;
    long long hi_signed = PyLong_AsLongLongAndOverflow(high, &overflow);
    unsigned long long hi;
    if (overflow > 0) {
        hi = PyLong_AsUnsignedLongLong(high);
        if (hi == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(high);
            return -1;
        }
    }
    else if (overflow < 0 || hi_signed < 0) {
        Py_DECREF(high);
        return -1; /* not a 128-bit unsigned value */
    }
    else {
        hi = (unsigned long long)hi_signed;
    }
    Py_DECREF(high);
    unsigned char be[16];
    for (int i = 0; i < 8; i++) {
        be[i] = (unsigned char)(hi >> (56 - 8 * i));
        be[8 + i] = (unsigned char)(lo >> (56 - 8 * i));
    }
    /* bytes_le: the first three fields little-endian. */
    out[0] = be[3];
    out[1] = be[2];
    out[2] = be[1];
    out[3] = be[0];
    out[4] = be[5];
    out[5] = be[4];
    out[6] = be[7];
    out[7] = be[6];
    memcpy(out + 8, be + 8, 8);
    return 0;
}

static int
put_guid_element(Buf *b, const char *key, Py_ssize_t klen, PyObject *value)
{
    unsigned char raw[16];
    if (guid_bytes(value, raw) < 0) {
        return -1;
    }
    if (put_header(b, B_BINARY, key, klen) < 0) {
        return -1;
    }
    NEED(b, 21);
    put_i32(b, 16);
    put_u8(b, 4);
    put_bytes(b, (const char *)raw, 16);
    return 0;
}

/* uuid.UUID(bytes_le=raw), built as UUID.__init__ builds it. */
static PyObject *
guid_from_bytes_le(const unsigned char *raw)
{
    unsigned char be[16];
    be[0] = raw[3];
    be[1] = raw[2];
    be[2] = raw[1];
    be[3] = raw[0];
    be[4] = raw[5];
    be[5] = raw[4];
    be[6] = raw[7];
    be[7] = raw[6];
    memcpy(be + 8, raw + 8, 8);
    if (g_uuid_int == NULL || g_uuid_is_safe == NULL) {
        PyObject *data = PyBytes_FromStringAndSize((const char *)raw, 16);
        if (data == NULL) {
            return NULL;
        }
        PyObject *kwargs = Py_BuildValue("{s:N}", "bytes_le", data);
        if (kwargs == NULL) {
            return NULL;
        }
        PyObject *result = PyObject_Call(g_uuid, g_empty_tuple, kwargs);
        Py_DECREF(kwargs);
        return result;
    }
    unsigned long long hi = 0, lo = 0;
    for (int i = 0; i < 8; i++) {
        hi = (hi << 8) | be[i];
        lo = (lo << 8) | be[8 + i];
    }
    PyObject *number;
    if (hi == 0) {
        number = PyLong_FromUnsignedLongLong(lo);
    }
    else {
        PyObject *h = PyLong_FromUnsignedLongLong(hi);
        PyObject *l = PyLong_FromUnsignedLongLong(lo);
        PyObject *sixty_four = PyLong_FromLong(64);
        PyObject *shifted = (h && sixty_four) ? PyNumber_Lshift(h, sixty_four) : NULL;
        number = (shifted && l) ? PyNumber_Or(shifted, l) : NULL;
        Py_XDECREF(h);
        Py_XDECREF(l);
        Py_XDECREF(sixty_four);
        Py_XDECREF(shifted);
    }
    if (number == NULL) {
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)g_uuid;
    PyObject *guid = type->tp_alloc(type, 0);
    if (guid == NULL) {
        Py_DECREF(number);
        return NULL;
    }
    descrsetfunc set_int = Py_TYPE(g_uuid_int)->tp_descr_set;
    descrsetfunc set_safe = Py_TYPE(g_uuid_is_safe)->tp_descr_set;
    if (set_int(g_uuid_int, guid, number) < 0 ||
        set_safe(g_uuid_is_safe, guid, g_safe_unknown) < 0) {
        Py_DECREF(number);
        Py_DECREF(guid);
        return NULL;
    }
    Py_DECREF(number);
    return guid;
}

/* --- datetimes ------------------------------------------------------------- */

/* Days from 1970-01-01 to y-m-d, proleptic Gregorian (H. Hinnant). */
static long long
days_from_civil(long long y, unsigned m, unsigned d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

static void
civil_from_days(long long z, long long *y, unsigned *m, unsigned *d)
{
    z += 719468;
    long long era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long long yy = (long long)yoe + era * 400;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = yy + (*m <= 2);
}

/* Json.NET's milliseconds for an aware datetime (truncated towards zero). */
static int
datetime_millis(PyObject *value, long long *out)
{
    if (!PyDateTime_CheckExact(value)) {
        return -1;
    }
    PyDateTime_DateTime *dt = (PyDateTime_DateTime *)value;
    if (!dt->hastzinfo) {
        return -1; /* naive: Python raises TypeError */
    }
    long long offset_us = 0;
    if (dt->tzinfo != g_utc) {
        PyObject *offset = PyObject_CallMethodNoArgs(value, s_utcoffset);
        if (offset == NULL) {
            return -1;
        }
        if (!PyDelta_Check(offset)) {
            Py_DECREF(offset);
            return -1;
        }
        offset_us = ((long long)PyDateTime_DELTA_GET_DAYS(offset) * 86400 +
                     PyDateTime_DELTA_GET_SECONDS(offset)) * 1000000LL +
                    PyDateTime_DELTA_GET_MICROSECONDS(offset);
        Py_DECREF(offset);
    }
    long long days = days_from_civil(PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value),
                                     PyDateTime_GET_DAY(value));
    long long micros = ((days * 24 + PyDateTime_DATE_GET_HOUR(value)) * 60 +
                        PyDateTime_DATE_GET_MINUTE(value)) * 60 +
                       PyDateTime_DATE_GET_SECOND(value);
    micros = micros * 1000000LL + PyDateTime_DATE_GET_MICROSECOND(value) - offset_us;
    long long millis = (micros < 0 ? -micros : micros) / 1000;
    *out = micros < 0 ? -millis : millis;
    return 0;
}

static int
put_datetime_element(Buf *b, const char *key, Py_ssize_t klen, PyObject *value)
{
    long long millis;
    if (datetime_millis(value, &millis) < 0) {
        return -1;
    }
    if (put_header(b, B_DATETIME, key, klen) < 0) {
        return -1;
    }
    NEED(b, 8);
    put_i64(b, (int64_t)millis);
    return 0;
}

/* UNIX_EPOCH + timedelta(milliseconds=millis), within years 1..9999. */
static PyObject *
datetime_from_millis(long long millis)
{
    long long days = millis / 86400000LL;
    long long rest = millis % 86400000LL;
    if (rest < 0) {
        rest += 86400000LL;
        days -= 1;
    }
    /* 0001-01-01 is day -719162, 9999-12-31 day 2932896. */
    if (days < -719162 || days > 2932896) {
        return NULL; /* Python raises CodecError */
    }
    long long y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    int ms = (int)(rest % 1000);
    long long secs = rest / 1000;
    return PyDateTimeAPI->DateTime_FromDateAndTime(
        (int)y, (int)m, (int)d, (int)(secs / 3600), (int)(secs / 60 % 60), (int)(secs % 60),
        ms * 1000, g_utc, PyDateTimeAPI->DateTimeType);
}

/* --- TimeSpan ------------------------------------------------------------------ */

/* TimeSpan.format(): [-][d.]hh:mm:ss[.fffffff] */
static PyObject *
timespan_text(long long ticks)
{
    unsigned long long magnitude =
        ticks < 0 ? (unsigned long long)(-(ticks + 1)) + 1 : (unsigned long long)ticks;
    unsigned long long days = magnitude / TICKS_PER_DAY;
    unsigned long long rest = magnitude % TICKS_PER_DAY;
    unsigned hours = (unsigned)(rest / TICKS_PER_HOUR);
    rest %= TICKS_PER_HOUR;
    unsigned minutes = (unsigned)(rest / TICKS_PER_MINUTE);
    rest %= TICKS_PER_MINUTE;
    unsigned seconds = (unsigned)(rest / TICKS_PER_SECOND);
    unsigned fraction = (unsigned)(rest % TICKS_PER_SECOND);
    char text[64];
    int n = 0;
    if (ticks < 0) {
        text[n++] = '-';
    }
    if (days) {
        n += snprintf(text + n, sizeof(text) - n, "%llu.", days);
    }
    n += snprintf(text + n, sizeof(text) - n, "%02u:%02u:%02u", hours, minutes, seconds);
    if (fraction) {
        n += snprintf(text + n, sizeof(text) - n, ".%07u", fraction);
    }
    return PyUnicode_FromStringAndSize(text, n);
}

/*
 * TimeSpan.parse for what Json.NET writes, [-][d.]h[h]:m[m][:s[s][.f{1,7}]]
 * with nothing around it: the ticks, or -1 to leave the text to Python
 * (surrounding spaces, bare days, anything out of range or malformed).
 */
static int
parse_digits(const Py_UCS1 *p, Py_ssize_t n, Py_ssize_t *pos, int most, unsigned long long *out,
             int *count)
{
    unsigned long long value = 0;
    int digits = 0;
    while (*pos < n && p[*pos] >= '0' && p[*pos] <= '9') {
        if (++digits > most) {
            return -1;
        }
        value = value * 10 + (unsigned long long)(p[*pos] - '0');
        (*pos)++;
    }
    if (digits == 0) {
        return -1;
    }
    *out = value;
    *count = digits;
    return 0;
}

static int
timespan_parse_ticks(PyObject *text, long long *out)
{
    if (!PyUnicode_CheckExact(text) || PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND) {
        return -1;
    }
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), pos = 0;
    int negative = 0, count;
    unsigned long long first, days = 0, hours, minutes, seconds = 0, fraction = 0;
    if (pos < n && p[pos] == '-') {
        negative = 1;
        pos++;
    }
    if (parse_digits(p, n, &pos, 8, &first, &count) < 0 || pos >= n) {
        return -1;
    }
    if (p[pos] == '.') {
        days = first;
        pos++;
        if (parse_digits(p, n, &pos, 2, &hours, &count) < 0) {
            return -1;
        }
    }
    else if (count <= 2) {
        hours = first;
    }
    else {
        return -1;
    }
    if (pos >= n || p[pos++] != ':' || parse_digits(p, n, &pos, 2, &minutes, &count) < 0) {
        return -1;
    }
    if (pos < n && p[pos] == ':') {
        pos++;
        if (parse_digits(p, n, &pos, 2, &seconds, &count) < 0) {
            return -1;
        }
        if (pos < n && p[pos] == '.') {
            pos++;
            if (parse_digits(p, n, &pos, 7, &fraction, &count) < 0) {
                return -1;
            }
            for (; count < 7; count++) {
                fraction *= 10;
            }
        }
    }
    if (pos != n || hours > 23 || minutes > 59 || seconds > 59) {
        return -1;
    }
    /* Eight digits of days can overflow 64 bits (10^8 days are 8.64e19
     * ticks): beyond TimeSpan's range, the text is Python's to refuse. */
    if (days > (unsigned long long)INT64_MAX / TICKS_PER_DAY) {
        return -1;
    }
    /* days * TICKS_PER_DAY <= INT64_MAX and the rest is under a day, so
     * this fits in 64 unsigned bits. */
    unsigned long long magnitude = days * (unsigned long long)TICKS_PER_DAY +
                                   hours * TICKS_PER_HOUR + minutes * TICKS_PER_MINUTE +
                                   seconds * TICKS_PER_SECOND + fraction;
    if (magnitude > (unsigned long long)INT64_MAX + (negative ? 1u : 0u)) {
        return -1;
    }
    *out = negative ? (long long)(0 - magnitude) : (long long)magnitude;
    return 0;
}

static PyObject *
timespan_from_text(PyObject *text)
{
    long long ticks;
    if (timespan_parse_ticks(text, &ticks) < 0) {
        return PyObject_CallOneArg(g_timespan_parse, text);
    }
    PyObject *number = PyLong_FromLongLong(ticks);
    if (number == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_CallOneArg(g_timespan, number);
    Py_DECREF(number);
    return result;
}

/* The ticks of a TimeSpan, or of a timedelta as TimeSpan.from_timedelta. */
static int
timespan_ticks(PyObject *value, long long *out)
{
    if (Py_TYPE(value) == (PyTypeObject *)g_timespan) {
        PyObject *ticks = Py_TYPE(g_timespan_ticks)->tp_descr_get(g_timespan_ticks, value, g_timespan);
        if (ticks == NULL) {
            return -1;
        }
        if (!PyLong_CheckExact(ticks)) {
            Py_DECREF(ticks);
            return -1;
        }
        int overflow = 0;
        long long t = PyLong_AsLongLongAndOverflow(ticks, &overflow);
        Py_DECREF(ticks);
        if (overflow || (t == -1 && PyErr_Occurred())) {
            return -1;
        }
        *out = t;
        return 0;
    }
    if (PyDelta_CheckExact(value)) {
        /* |timedelta| < 10^9 days: the tick count needs care near Int64. */
        long long days = PyDateTime_DELTA_GET_DAYS(value);
        long long micros_of_day = (long long)PyDateTime_DELTA_GET_SECONDS(value) * 1000000LL +
                                  PyDateTime_DELTA_GET_MICROSECONDS(value);
        /* Int64 ticks span about +-10675199 days. */
        if (days > 10675198 || days < -10675199) {
            return -1;
        }
        long long ticks = (days * 86400000000LL + micros_of_day) * 10;
        *out = ticks;
        return 0;
    }
    return -1;
}

static int
put_timespan_element(Buf *b, const char *key, Py_ssize_t klen, PyObject *value)
{
    long long ticks;
    if (timespan_ticks(value, &ticks) < 0) {
        return -1;
    }
    PyObject *text = timespan_text(ticks);
    if (text == NULL) {
        return -1;
    }
    int rc = put_string_element(b, key, klen, text);
    Py_DECREF(text);
    return rc;
}

/* --- generic trees: encode ----------------------------------------------------- */

static int enc_generic(Buf *b, const char *key, Py_ssize_t klen, PyObject *v, int depth,
                       int max_depth);

static int
enc_generic_dict(Buf *b, PyObject *dict, int depth, int max_depth)
{
    if (depth > max_depth || depth > MAX_C_DEPTH) {
        return -1;
    }
    Py_ssize_t start;
    if (open_container(b, &start) < 0) {
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        Utf8 u;
        if (utf8_of(key, &u) < 0) {
            return -1;
        }
        if (memchr(u.p, 0, (size_t)u.n) != NULL) {
            Py_XDECREF(u.owner);
            return -1;
        }
        /* The value may run arbitrary code only through utcoffset(); keep
         * the key and the value alive across it. */
        Py_INCREF(key);
        Py_INCREF(value);
        int rc = enc_generic(b, u.p, u.n, value, depth, max_depth);
        Py_DECREF(value);
        Py_XDECREF(u.owner);
        Py_DECREF(key);
        if (rc < 0) {
            return -1;
        }
    }
    return close_container(b, start);
}

static int
enc_generic_sequence(Buf *b, PyObject *seq, int depth, int max_depth)
{
    if (depth > max_depth || depth > MAX_C_DEPTH) {
        return -1;
    }
    Py_ssize_t start;
    if (open_container(b, &start) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        char key[24];
        int klen = snprintf(key, sizeof(key), "%zd", i);
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(item);
        int rc = enc_generic(b, key, klen, item, depth, max_depth);
        Py_DECREF(item);
        if (rc < 0) {
            return -1;
        }
    }
    return close_container(b, start);
}

/* One element for a value of the generic model (bson.py's table). */
static int
enc_generic(Buf *b, const char *key, Py_ssize_t klen, PyObject *v, int depth, int max_depth)
{
    PyTypeObject *type = Py_TYPE(v);
    if (v == Py_None) {
        return put_header(b, B_NULL, key, klen);
    }
    if (v == Py_True || v == Py_False) {
        if (put_header(b, B_BOOLEAN, key, klen) < 0) {
            return -1;
        }
        NEED(b, 1);
        put_u8(b, v == Py_True);
        return 0;
    }
    if (type == (PyTypeObject *)g_int64) {
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (value == -1 && PyErr_Occurred())) {
            return -1;
        }
        return put_int64_element(b, key, klen, value);
    }
    if (type == &PyLong_Type) {
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (value == -1 && PyErr_Occurred())) {
            return -1;
        }
        return put_int_element(b, key, klen, value);
    }
    if (type == &PyFloat_Type) {
        if (put_header(b, B_DOUBLE, key, klen) < 0) {
            return -1;
        }
        double d = PyFloat_AS_DOUBLE(v);
        int64_t bits;
        memcpy(&bits, &d, 8);
        NEED(b, 8);
        put_i64(b, bits);
        return 0;
    }
    if (type == &PyUnicode_Type) {
        return put_string_element(b, key, klen, v);
    }
    if (type == &PyBytes_Type || type == &PyByteArray_Type) {
        const char *p = type == &PyBytes_Type ? PyBytes_AS_STRING(v) : PyByteArray_AS_STRING(v);
        Py_ssize_t n = type == &PyBytes_Type ? PyBytes_GET_SIZE(v) : PyByteArray_GET_SIZE(v);
        if (n > INT32_MAX) {
            return -1;
        }
        if (put_header(b, B_BINARY, key, klen) < 0) {
            return -1;
        }
        NEED(b, n + 5);
        put_i32(b, (int32_t)n);
        put_u8(b, 0);
        put_bytes(b, p, n);
        return 0;
    }
    if (type == (PyTypeObject *)g_uuid) {
        return put_guid_element(b, key, klen, v);
    }
    if (type == PyDateTimeAPI->DateTimeType) {
        return put_datetime_element(b, key, klen, v);
    }
    if (type == &PyDict_Type) {
        if (put_header(b, B_DOCUMENT, key, klen) < 0) {
            return -1;
        }
        return enc_generic_dict(b, v, depth + 1, max_depth);
    }
    if (type == &PyList_Type || type == &PyTuple_Type) {
        if (put_header(b, B_ARRAY, key, klen) < 0) {
            return -1;
        }
        return enc_generic_sequence(b, v, depth + 1, max_depth);
    }
    return -1;
}

static PyObject *
finish_buffer(Buf *b)
{
    PyObject *result = PyBytes_FromStringAndSize(b->data, b->len);
    PyMem_Free(b->data);
    return result;
}

static PyObject *
codec_encode_document(PyObject *module, PyObject *args)
{
    PyObject *doc;
    int max_depth;
    if (!PyArg_ParseTuple(args, "Oi:encode_document", &doc, &max_depth)) {
        return NULL;
    }
    if (!values_configured || !PyDict_CheckExact(doc)) {
        Py_RETURN_NONE;
    }
    Buf b = {NULL, 0, 0};
    if (enc_generic_dict(&b, doc, 1, max_depth) < 0) {
        PyMem_Free(b.data);
        return decline();
    }
    return finish_buffer(&b);
}

/* --- generic trees: decode ------------------------------------------------------- */

static inline int32_t
load_i32(const unsigned char *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                     (uint32_t)p[3] << 24);
}

static inline int64_t
load_i64(const unsigned char *p)
{
    uint64_t lo = (uint32_t)load_i32(p);
    uint64_t hi = (uint32_t)load_i32(p + 4);
    return (int64_t)(lo | hi << 32);
}

/*
 * A small cache of decoded keys: Halibut messages repeat the same few
 * member names, so most keys are found here instead of being decoded and
 * allocated again.  Entries are replaced on collision, so it never grows.
 */
#define KEY_CACHE_SIZE 512
#define KEY_CACHE_MAX_LEN 40
static PyObject *key_cache[KEY_CACHE_SIZE];

static PyObject *
decode_key(const unsigned char *p, Py_ssize_t n)
{
    if (n > KEY_CACHE_MAX_LEN) {
        return PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    }
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 16777619u;
    }
    PyObject **slot = &key_cache[h % KEY_CACHE_SIZE];
    PyObject *cached = *slot;
    if (cached != NULL && PyUnicode_GET_LENGTH(cached) == n &&
        memcmp(PyUnicode_DATA(cached), p, (size_t)n) == 0) {
        Py_INCREF(cached);
        return cached;
    }
    PyObject *key = PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    if (key == NULL) {
        return NULL;
    }
    if (PyUnicode_IS_ASCII(key)) {
        Py_INCREF(key);
        Py_XSETREF(*slot, key);
    }
    return key;
}

typedef struct {
    PyObject *container;
    Py_ssize_t end;
} Frame;

static PyObject *
decode_tree(const unsigned char *data, Py_ssize_t size, Py_ssize_t max_depth,
            Py_ssize_t max_string)
{
    if (size < 5 || load_i32(data) != size) {
        return NULL;
    }
    PyObject *root = PyDict_New();
    if (root == NULL) {
        return NULL;
    }
    Py_ssize_t cap = 16, depth = 1;
    Frame *stack = PyMem_Malloc(sizeof(Frame) * cap);
    if (stack == NULL) {
        Py_DECREF(root);
        PyErr_NoMemory();
        return NULL;
    }
    stack[0].container = root; /* borrowed: the parent holds each child */
    stack[0].end = size;
    Py_ssize_t pos = 4;
    while (depth > 0) {
        PyObject *container = stack[depth - 1].container;
        Py_ssize_t end = stack[depth - 1].end;
        if (pos >= end) {
            goto fail;
        }
        unsigned kind = data[pos++];
        if (kind == 0) {
            if (pos != end) {
                goto fail;
            }
            depth--;
            continue;
        }
        const unsigned char *nul = memchr(data + pos, 0, (size_t)(end - pos));
        if (nul == NULL) {
            goto fail;
        }
        Py_ssize_t key_start = pos, key_len = nul - (data + pos);
        if (key_len > max_string) {
            goto fail;
        }
        pos = key_len + key_start + 1;

        PyObject *value = NULL;
        Py_ssize_t child_end = 0;
        switch (kind) {
        case B_DOCUMENT:
        case B_ARRAY: {
            if (pos + 4 > end) {
                goto fail;
            }
            int32_t length = load_i32(data + pos);
            if (length < 5 || length > end - pos) {
                goto fail;
            }
            if (depth >= max_depth) {
                goto fail;
            }
            value = kind == B_DOCUMENT ? PyDict_New() : PyList_New(0);
            child_end = pos + length;
            pos += 4;
            break;
        }
        case B_STRING: {
            if (pos + 4 > end) {
                goto fail;
            }
            int32_t length = load_i32(data + pos);
            if (length < 1 || length > end - pos - 4) {
                goto fail;
            }
            if (length - 1 > max_string) {
                goto fail;
            }
            Py_ssize_t stop = pos + 4 + length - 1;
            if (data[stop] != 0) {
                goto fail;
            }
            value = PyUnicode_DecodeUTF8((const char *)data + pos + 4, length - 1, NULL);
            pos = stop + 1;
            break;
        }
        case B_INT32:
            if (pos + 4 > end) {
                goto fail;
            }
            value = PyLong_FromLong(load_i32(data + pos));
            pos += 4;
            break;
        case B_INT64: {
            if (pos + 8 > end) {
                goto fail;
            }
            PyObject *number = PyLong_FromLongLong(load_i64(data + pos));
            if (number == NULL) {
                goto fail;
            }
            PyObject *args = PyTuple_Pack(1, number);
            Py_DECREF(number);
            if (args == NULL) {
                goto fail;
            }
            /* int.__new__(Int64, n): in range by construction. */
            value = PyLong_Type.tp_new((PyTypeObject *)g_int64, args, NULL);
            Py_DECREF(args);
            pos += 8;
            break;
        }
        case B_DOUBLE: {
            if (pos + 8 > end) {
                goto fail;
            }
            int64_t bits = load_i64(data + pos);
            double d;
            memcpy(&d, &bits, 8);
            value = PyFloat_FromDouble(d);
            pos += 8;
            break;
        }
        case B_BOOLEAN:
            if (pos + 1 > end || data[pos] > 1) {
                goto fail;
            }
            value = data[pos] ? Py_True : Py_False;
            Py_INCREF(value);
            pos += 1;
            break;
        case B_NULL:
            value = Py_None;
            Py_INCREF(value);
            break;
        case B_DATETIME:
            if (pos + 8 > end) {
                goto fail;
            }
            value = datetime_from_millis(load_i64(data + pos));
            pos += 8;
            break;
        case B_BINARY: {
            if (pos + 5 > end) {
                goto fail;
            }
            int32_t length = load_i32(data + pos);
            unsigned subtype = data[pos + 4];
            Py_ssize_t start = pos + 5;
            if (length < 0 || length > end - start) {
                goto fail;
            }
            const unsigned char *payload = data + start;
            if (subtype == 4 || (subtype == 3 && length == 16)) {
                if (length != 16) {
                    goto fail;
                }
                value = guid_from_bytes_le(payload);
            }
            else if (subtype == 2) {
                if (length < 4 || load_i32(payload) != length - 4) {
                    goto fail;
                }
                value = PyBytes_FromStringAndSize((const char *)payload + 4, length - 4);
            }
            else {
                value = PyBytes_FromStringAndSize((const char *)payload, length);
            }
            pos = start + length;
            break;
        }
        default:
            goto fail;
        }
        if (value == NULL) {
            goto fail;
        }

        if (PyList_CheckExact(container)) {
            if (PyList_Append(container, value) < 0) {
                Py_DECREF(value);
                goto fail;
            }
        }
        else {
            PyObject *key = decode_key(data + key_start, key_len);
            if (key == NULL) {
                Py_DECREF(value);
                goto fail;
            }
            Py_ssize_t before = PyDict_GET_SIZE(container);
            int rc = PyDict_SetItem(container, key, value);
            Py_DECREF(key);
            if (rc < 0 || PyDict_GET_SIZE(container) == before) {
                Py_DECREF(value); /* a duplicate key: Python raises */
                goto fail;
            }
        }
        if (kind == B_DOCUMENT || kind == B_ARRAY) {
            if (depth == cap) {
                Frame *bigger = PyMem_Realloc(stack, sizeof(Frame) * cap * 2);
                if (bigger == NULL) {
                    Py_DECREF(value);
                    PyErr_NoMemory();
                    goto fail;
                }
                stack = bigger;
                cap *= 2;
            }
            stack[depth].container = value;
            stack[depth].end = child_end;
            depth++;
        }
        Py_DECREF(value); /* its container holds it */
    }
    PyMem_Free(stack);
    return root;
fail:
    PyMem_Free(stack);
    Py_DECREF(root);
    return NULL;
}

static PyObject *
codec_decode_document(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_message, max_depth, max_string;
    if (!PyArg_ParseTuple(args, "y*nnn:decode_document", &view, &max_message, &max_depth,
                          &max_string)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (!values_configured || view.len > max_message) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *tree = decode_tree((const unsigned char *)view.buf, view.len, max_depth, max_string);
    PyBuffer_Release(&view);
    if (tree == NULL) {
        return decline();
    }
    return tree;
}

/* --- plans ------------------------------------------------------------------------
 *
 * plan  = (cls, type_element | None, fields, construct)
 * field = (attribute, key_bytes, key_str, spec)
 * spec  = (tag, ...) as below
 * construct = (C_CALL,) | (C_SLOTS, setters, validators)
 *   setters    = ((field_index, descriptor, converter | None), ...) in attrs order
 *   validators = ((field_index, validator, attribute), ...)
 */

static PyObject *
plan_of(PyObject *cls)
{
    PyObject *plan = PyDict_GetItemWithError(g_plans, cls);
    if (plan != NULL) {
        /* Borrowed; plans are never removed.  None marks a class the pure
         * code must handle. */
        return PyTuple_CheckExact(plan) ? plan : NULL;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *made = PyObject_CallOneArg(g_plan_for, cls);
    if (made == NULL) {
        return NULL;
    }
    Py_DECREF(made); /* plan_for stored it in g_plans */
    plan = PyDict_GetItemWithError(g_plans, cls);
    if (plan == NULL || !PyTuple_CheckExact(plan)) {
        return NULL; /* None: a class the pure code must handle */
    }
    return plan;
}

static inline long
spec_tag(PyObject *spec)
{
    return PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
}

/* --- objects: encode ----------------------------------------------------------------- */

typedef struct {
    PyObject *streams;
    int max_depth;
} EncCtx;

static int enc_spec(EncCtx *ctx, Buf *b, const char *key, Py_ssize_t klen, PyObject *spec,
                    PyObject *value, int depth);

/* The document of an object (depth is the document's own nesting level). */
static int
enc_object(EncCtx *ctx, Buf *b, PyObject *plan, PyObject *value, int with_type, int depth)
{
    if (depth > ctx->max_depth || depth > MAX_C_DEPTH) {
        return -1;
    }
    Py_ssize_t start;
    if (open_container(b, &start) < 0) {
        return -1;
    }
    if (with_type) {
        PyObject *type_element = PyTuple_GET_ITEM(plan, 1);
        if (!PyBytes_CheckExact(type_element)) {
            return -1; /* not a named wire class */
        }
        NEED(b, PyBytes_GET_SIZE(type_element));
        put_bytes(b, PyBytes_AS_STRING(type_element), PyBytes_GET_SIZE(type_element));
    }
    PyObject *fields = PyTuple_GET_ITEM(plan, 2);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        PyObject *key = PyTuple_GET_ITEM(field, 1);
        PyObject *item = PyObject_GetAttr(value, PyTuple_GET_ITEM(field, 0));
        if (item == NULL) {
            return -1;
        }
        int rc = enc_spec(ctx, b, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                          PyTuple_GET_ITEM(field, 3), item, depth);
        Py_DECREF(item);
        if (rc < 0) {
            return -1;
        }
    }
    if (close_container(b, start) < 0) {
        return -1;
    }
    if (Py_TYPE(value) == (PyTypeObject *)g_datastream && PyList_Append(ctx->streams, value) < 0) {
        return -1;
    }
    return 0;
}

/* A value in a slot declared as object (serializer._Object.encode). */
static int
enc_object_slot(EncCtx *ctx, Buf *b, const char *key, Py_ssize_t klen, PyObject *value, int depth)
{
    PyTypeObject *type = Py_TYPE(value);
    if (value == Py_None || value == Py_True || value == Py_False || type == &PyLong_Type ||
        type == (PyTypeObject *)g_int64 || type == &PyFloat_Type || type == &PyUnicode_Type ||
        type == &PyBytes_Type || type == (PyTypeObject *)g_uuid ||
        type == PyDateTimeAPI->DateTimeType) {
        return enc_generic(b, key, klen, value, depth, ctx->max_depth);
    }
    if (type == (PyTypeObject *)g_timespan || type == PyDateTimeAPI->DeltaType) {
        return put_timespan_element(b, key, klen, value);
    }
    if (PyLong_Check(value)) {
        long long number;
        if (int_value(value, &number) < 0) {
            return -1; /* only IntEnum members are written as plain ints */
        }
        return put_int_element(b, key, klen, number);
    }
    PyObject *plan = plan_of((PyObject *)type);
    if (plan == NULL) {
        return -1;
    }
    if (put_header(b, B_DOCUMENT, key, klen) < 0) {
        return -1;
    }
    return enc_object(ctx, b, plan, value, 1, depth + 1);
}

/* One element for `value` in a slot declared as `spec`, at container depth `depth`. */
static int
enc_spec(EncCtx *ctx, Buf *b, const char *key, Py_ssize_t klen, PyObject *spec, PyObject *value,
         int depth)
{
    switch (spec_tag(spec)) {
    case T_STRING:
        if (!PyUnicode_CheckExact(value)) {
            return -1;
        }
        return put_string_element(b, key, klen, value);
    case T_BOOLEAN:
        if (value != Py_True && value != Py_False) {
            return -1;
        }
        if (put_header(b, B_BOOLEAN, key, klen) < 0) {
            return -1;
        }
        NEED(b, 1);
        put_u8(b, value == Py_True);
        return 0;
    case T_INT32: {
        long long number;
        if (PyBool_Check(value) || int_value(value, &number) < 0) {
            return -1;
        }
        if (number < INT32_MIN || number > INT32_MAX) {
            return -1;
        }
        return put_int_element(b, key, klen, number);
    }
    case T_INT64: {
        long long number;
        if (PyBool_Check(value) || int_value(value, &number) < 0) {
            return -1;
        }
        return put_int64_element(b, key, klen, number);
    }
    case T_GUID:
        if (Py_TYPE(value) != (PyTypeObject *)g_uuid) {
            return -1;
        }
        return put_guid_element(b, key, klen, value);
    case T_TIMESPAN:
        return put_timespan_element(b, key, klen, value);
    case T_DATETIMEOFFSET:
        return put_datetime_element(b, key, klen, value);
    case T_OBJECT:
        return enc_object_slot(ctx, b, key, klen, value, depth);
    case T_RAW:
        return enc_generic(b, key, klen, value, depth, ctx->max_depth);
    case T_ENUM: {
        /* The plan only has IntEnum classes here, whose int() is the value. */
        if (!PyObject_TypeCheck(value, (PyTypeObject *)PyTuple_GET_ITEM(spec, 1))) {
            return -1;
        }
        int overflow = 0;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (number == -1 && PyErr_Occurred())) {
            return -1;
        }
        return put_int_element(b, key, klen, number);
    }
    case T_NULLABLE:
        if (value == Py_None) {
            return put_header(b, B_NULL, key, klen);
        }
        return enc_spec(ctx, b, key, klen, PyTuple_GET_ITEM(spec, 1), value, depth);
    case T_LIST: {
        if (!PyList_CheckExact(value) && !PyTuple_CheckExact(value)) {
            return -1;
        }
        if (depth + 1 > ctx->max_depth || depth + 1 > MAX_C_DEPTH) {
            return -1;
        }
        if (put_header(b, B_ARRAY, key, klen) < 0) {
            return -1;
        }
        Py_ssize_t start;
        if (open_container(b, &start) < 0) {
            return -1;
        }
        PyObject *item_spec = PyTuple_GET_ITEM(spec, 1);
        Py_INCREF(value);
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(value); i++) {
            char index[24];
            int ilen = snprintf(index, sizeof(index), "%zd", i);
            PyObject *item = PySequence_Fast_GET_ITEM(value, i);
            Py_INCREF(item);
            int rc = enc_spec(ctx, b, index, ilen, item_spec, item, depth + 1);
            Py_DECREF(item);
            if (rc < 0) {
                Py_DECREF(value);
                return -1;
            }
        }
        Py_DECREF(value);
        return close_container(b, start);
    }
    case T_ENUMDICT: {
        PyObject *enum_cls = PyTuple_GET_ITEM(spec, 1);
        PyObject *value_spec = PyTuple_GET_ITEM(spec, 2);
        PyObject *names = PyTuple_GET_ITEM(spec, 3);
        if (!PyDict_CheckExact(value) || depth + 1 > ctx->max_depth || depth + 1 > MAX_C_DEPTH) {
            return -1;
        }
        if (put_header(b, B_DOCUMENT, key, klen) < 0) {
            return -1;
        }
        Py_ssize_t start;
        if (open_container(b, &start) < 0) {
            return -1;
        }
        /* Pure code builds a dict keyed by name; two members never share one. */
        Py_ssize_t pos = 0;
        PyObject *member, *item;
        Py_INCREF(value);
        while (PyDict_Next(value, &pos, &member, &item)) {
            if (!PyObject_TypeCheck(member, (PyTypeObject *)enum_cls)) {
                Py_DECREF(value);
                return -1;
            }
            PyObject *name = PyDict_GetItemWithError(names, member);
            Utf8 u;
            if (name == NULL || utf8_of(name, &u) < 0) {
                Py_DECREF(value);
                return -1;
            }
            Py_INCREF(item);
            int rc = enc_spec(ctx, b, u.p, u.n, value_spec, item, depth + 1);
            Py_DECREF(item);
            Py_XDECREF(u.owner);
            if (rc < 0) {
                Py_DECREF(value);
                return -1;
            }
        }
        Py_DECREF(value);
        return close_container(b, start);
    }
    case T_COMPLEX: {
        PyObject *cls = PyTuple_GET_ITEM(spec, 1);
        if ((PyObject *)Py_TYPE(value) != cls) {
            return -1;
        }
        PyObject *plan = plan_of(cls);
        if (plan == NULL) {
            return -1;
        }
        if (put_header(b, B_DOCUMENT, key, klen) < 0) {
            return -1;
        }
        return enc_object(ctx, b, plan, value, 0, depth + 1);
    }
    default:
        return -1;
    }
}

static PyObject *
codec_encode_message(PyObject *module, PyObject *args)
{
    PyObject *message;
    int max_depth;
    if (!PyArg_ParseTuple(args, "Oi:encode_message", &message, &max_depth)) {
        return NULL;
    }
    if (!values_configured || !objects_configured) {
        Py_RETURN_NONE;
    }
    PyObject *plan = NULL;
    if (message != Py_None) {
        PyObject *cls = (PyObject *)Py_TYPE(message);
        if (cls != g_request && cls != g_response) {
            Py_RETURN_NONE;
        }
        plan = plan_of(cls);
        if (plan == NULL) {
            return decline();
        }
    }
    EncCtx ctx = {PyList_New(0), max_depth};
    if (ctx.streams == NULL) {
        return NULL;
    }
    Buf b = {NULL, 0, 0};
    Py_ssize_t start;
    int rc = max_depth < 1 ? -1 : open_container(&b, &start);
    if (rc == 0) {
        if (message == Py_None) {
            rc = put_header(&b, B_NULL, "Message", 7);
        }
        else if ((rc = put_header(&b, B_DOCUMENT, "Message", 7)) == 0) {
            rc = enc_object(&ctx, &b, plan, message, 1, 2);
        }
    }
    if (rc == 0) {
        rc = close_container(&b, start);
    }
    if (rc < 0) {
        PyMem_Free(b.data);
        Py_DECREF(ctx.streams);
        return decline();
    }
    PyObject *data = finish_buffer(&b);
    if (data == NULL) {
        Py_DECREF(ctx.streams);
        return NULL;
    }
    return Py_BuildValue("(NN)", data, ctx.streams);
}

/* --- objects: decode ------------------------------------------------------------------ */

typedef struct {
    PyObject *names;   /* dict: exact $type string -> class */
    PyObject *streams; /* list */
    int run_validators;
} DecCtx;

static PyObject *dec_spec(DecCtx *ctx, PyObject *spec, PyObject *tree, int depth);

/* The registered class an exact $type string names, or NULL (borrowed). */
static PyObject *
resolve(DecCtx *ctx, PyObject *tree)
{
    PyObject *name = PyDict_GetItemWithError(tree, s_type);
    if (name == NULL || !PyUnicode_CheckExact(name)) {
        return NULL;
    }
    return PyDict_GetItemWithError(ctx->names, name);
}

static PyObject *
construct(PyObject *plan, PyObject *fields, PyObject **values, int run_validators)
{
    PyObject *cls = PyTuple_GET_ITEM(plan, 0);
    PyObject *how = PyTuple_GET_ITEM(plan, 3);
    if (PyLong_AsLong(PyTuple_GET_ITEM(how, 0)) == C_CALL) {
        PyObject *kwargs = PyDict_New();
        if (kwargs == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
            PyObject *attribute = PyTuple_GET_ITEM(PyTuple_GET_ITEM(fields, i), 0);
            if (PyDict_SetItem(kwargs, attribute, values[i]) < 0) {
                Py_DECREF(kwargs);
                return NULL;
            }
        }
        PyObject *result = PyObject_Call(cls, g_empty_tuple, kwargs);
        Py_DECREF(kwargs);
        return result;
    }
    /* As attrs' generated __init__: converters, then every slot set, then
     * the validators in field order. */
    PyObject *setters = PyTuple_GET_ITEM(how, 1);
    PyObject *validators = PyTuple_GET_ITEM(how, 2);
    PyObject *obj = PyBaseObject_Type.tp_new((PyTypeObject *)cls, g_empty_tuple, NULL);
    if (obj == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(setters); i++) {
        PyObject *setter = PyTuple_GET_ITEM(setters, i);
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(setter, 0));
        PyObject *descriptor = PyTuple_GET_ITEM(setter, 1);
        PyObject *converter = PyTuple_GET_ITEM(setter, 2);
        if (converter != Py_None) {
            PyObject *converted = PyObject_CallOneArg(converter, values[index]);
            if (converted == NULL) {
                Py_DECREF(obj);
                return NULL;
            }
            Py_SETREF(values[index], converted);
        }
        if (Py_TYPE(descriptor)->tp_descr_set(descriptor, obj, values[index]) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    if (run_validators) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(validators); i++) {
            PyObject *entry = PyTuple_GET_ITEM(validators, i);
            Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 0));
            PyObject *validator = PyTuple_GET_ITEM(entry, 1);
            if (validator == g_require_aware && PyDateTime_Check(values[index]) &&
                ((PyDateTime_DateTime *)values[index])->hastzinfo &&
                ((PyDateTime_DateTime *)values[index])->tzinfo == g_utc) {
                continue; /* what require_aware accepts without a word */
            }
            PyObject *ok = PyObject_CallFunctionObjArgs(validator, obj,
                                                        PyTuple_GET_ITEM(entry, 2), values[index],
                                                        NULL);
            if (ok == NULL) {
                Py_DECREF(obj);
                return NULL;
            }
            Py_DECREF(ok);
        }
    }
    return obj;
}

/* serializer._object_from_tree, when every member is present by exact name. */
static PyObject *
dec_object(DecCtx *ctx, PyObject *plan, PyObject *tree, int depth)
{
    if (depth > MAX_C_DEPTH) {
        return NULL;
    }
    PyObject *fields = PyTuple_GET_ITEM(plan, 2);
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    PyObject *small[16];
    PyObject **values = n <= 16 ? small : PyMem_Calloc((size_t)n, sizeof(PyObject *));
    if (values == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t done = 0;
    for (; done < n; done++) {
        PyObject *field = PyTuple_GET_ITEM(fields, done);
        PyObject *member = PyDict_GetItemWithError(tree, PyTuple_GET_ITEM(field, 2));
        if (member == NULL) {
            goto out; /* absent, or only in another case: Python's job */
        }
        Py_INCREF(member);
        values[done] = dec_spec(ctx, PyTuple_GET_ITEM(field, 3), member, depth);
        Py_DECREF(member);
        if (values[done] == NULL) {
            goto out;
        }
    }
    result = construct(plan, fields, values, ctx->run_validators);
    if (result != NULL && Py_TYPE(result) == (PyTypeObject *)g_datastream &&
        PyList_Append(ctx->streams, result) < 0) {
        Py_CLEAR(result);
    }
out:
    for (Py_ssize_t i = 0; i < done; i++) {
        Py_DECREF(values[i]);
    }
    if (values != small) {
        PyMem_Free(values);
    }
    return result;
}

static PyObject *
dec_spec(DecCtx *ctx, PyObject *spec, PyObject *tree, int depth)
{
    switch (spec_tag(spec)) {
    case T_STRING:
        if (!PyUnicode_Check(tree)) {
            return NULL;
        }
        return Py_NewRef(tree);
    case T_BOOLEAN:
        if (!PyBool_Check(tree)) {
            return NULL;
        }
        return Py_NewRef(tree);
    case T_INT32:
    case T_INT64: {
        PyTypeObject *type = Py_TYPE(tree);
        if (type != &PyLong_Type && type != (PyTypeObject *)g_int64) {
            return NULL;
        }
        if (spec_tag(spec) == T_INT32) {
            int overflow = 0;
            long long number = PyLong_AsLongLongAndOverflow(tree, &overflow);
            if (overflow || number < INT32_MIN || number > INT32_MAX) {
                return NULL;
            }
        }
        if (type == &PyLong_Type) {
            return Py_NewRef(tree);
        }
        return PyNumber_Long(tree);
    }
    case T_GUID:
        if (!PyObject_TypeCheck(tree, (PyTypeObject *)g_uuid)) {
            return NULL; /* a Guid written as a string is Python's job */
        }
        return Py_NewRef(tree);
    case T_TIMESPAN:
        if (!PyUnicode_Check(tree)) {
            return NULL;
        }
        return timespan_from_text(tree);
    case T_DATETIMEOFFSET:
        if (!PyDateTime_Check(tree)) {
            return NULL;
        }
        return Py_NewRef(tree);
    case T_RAW:
        return Py_NewRef(tree);
    case T_OBJECT: {
        if (tree == Py_None || PyUnicode_Check(tree) || PyLong_Check(tree) || PyFloat_Check(tree) ||
            PyBytes_Check(tree) || PyDateTime_Check(tree) ||
            PyObject_TypeCheck(tree, (PyTypeObject *)g_uuid)) {
            return Py_NewRef(tree);
        }
        if (!PyDict_CheckExact(tree)) {
            return NULL; /* a dict subclass may answer lookups its own way */
        }
        PyObject *cls = resolve(ctx, tree);
        if (cls == NULL || cls == g_request || cls == g_response) {
            return NULL;
        }
        PyObject *plan = plan_of(cls);
        if (plan == NULL) {
            return NULL;
        }
        return dec_object(ctx, plan, tree, depth + 1);
    }
    case T_ENUM: {
        PyTypeObject *type = Py_TYPE(tree);
        if (type != &PyLong_Type && type != (PyTypeObject *)g_int64) {
            return NULL;
        }
        PyObject *member = PyDict_GetItemWithError(PyTuple_GET_ITEM(spec, 2), tree);
        if (member == NULL) {
            return NULL;
        }
        return Py_NewRef(member);
    }
    case T_NULLABLE:
        if (tree == Py_None) {
            Py_RETURN_NONE;
        }
        return dec_spec(ctx, PyTuple_GET_ITEM(spec, 1), tree, depth);
    case T_LIST: {
        if (!PyList_CheckExact(tree) || depth + 1 > MAX_C_DEPTH) {
            return NULL;
        }
        PyObject *item_spec = PyTuple_GET_ITEM(spec, 1);
        Py_ssize_t n = PyList_GET_SIZE(tree);
        PyObject *result = PyTuple_New(n);
        if (result == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i >= PyList_GET_SIZE(tree)) {
                Py_DECREF(result);
                return NULL; /* the list shrank under us */
            }
            PyObject *item = PyList_GET_ITEM(tree, i);
            Py_INCREF(item);
            PyObject *decoded = dec_spec(ctx, item_spec, item, depth + 1);
            Py_DECREF(item);
            if (decoded == NULL) {
                Py_DECREF(result);
                return NULL;
            }
            PyTuple_SET_ITEM(result, i, decoded);
        }
        return result;
    }
    case T_ENUMDICT: {
        if (!PyDict_CheckExact(tree) || depth + 1 > MAX_C_DEPTH) {
            return NULL;
        }
        int has_type = PyDict_Contains(tree, s_type);
        if (has_type != 0) {
            return NULL;
        }
        PyObject *value_spec = PyTuple_GET_ITEM(spec, 2);
        PyObject *by_name = PyTuple_GET_ITEM(spec, 4);
        PyObject *result = PyDict_New();
        if (result == NULL) {
            return NULL;
        }
        PyObject *items = PyDict_Items(tree);
        if (items == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
            PyObject *pair = PyList_GET_ITEM(items, i);
            PyObject *name = PyTuple_GET_ITEM(pair, 0);
            PyObject *member =
                PyUnicode_CheckExact(name) ? PyDict_GetItemWithError(by_name, name) : NULL;
            if (member == NULL) {
                Py_DECREF(items);
                Py_DECREF(result);
                return NULL;
            }
            PyObject *decoded = dec_spec(ctx, value_spec, PyTuple_GET_ITEM(pair, 1), depth + 1);
            if (decoded == NULL || PyDict_SetItem(result, member, decoded) < 0) {
                Py_XDECREF(decoded);
                Py_DECREF(items);
                Py_DECREF(result);
                return NULL;
            }
            Py_DECREF(decoded);
        }
        Py_DECREF(items);
        return result;
    }
    case T_COMPLEX: {
        PyObject *cls = PyTuple_GET_ITEM(spec, 1);
        if (!PyDict_CheckExact(tree)) {
            return NULL;
        }
        int has_type = PyDict_Contains(tree, s_type);
        if (has_type < 0 || (has_type && resolve(ctx, tree) != cls)) {
            return NULL;
        }
        PyObject *plan = plan_of(cls);
        if (plan == NULL) {
            return NULL;
        }
        return dec_object(ctx, plan, tree, depth + 1);
    }
    default:
        return NULL;
    }
}

static PyObject *
codec_decode_envelope(PyObject *module, PyObject *args)
{
    PyObject *tree, *names, *expected;
    int run_validators;
    if (!PyArg_ParseTuple(args, "OO!Op:decode_envelope", &tree, &PyDict_Type, &names, &expected,
                          &run_validators)) {
        return NULL;
    }
    if (!values_configured || !objects_configured || !PyDict_CheckExact(tree)) {
        Py_RETURN_NONE;
    }
    PyObject *body = PyDict_GetItemWithError(tree, s_message);
    if (body == NULL && PyErr_Occurred()) {
        return decline();
    }
    if (body == NULL || body == Py_None) {
        return Py_BuildValue("(ON)", Py_None, PyList_New(0));
    }
    if (!PyDict_CheckExact(body)) {
        Py_RETURN_NONE;
    }
    DecCtx ctx = {names, NULL, run_validators};
    PyObject *cls;
    int has_type = PyDict_Contains(body, s_type);
    if (has_type < 0) {
        return decline();
    }
    if (has_type) {
        cls = resolve(&ctx, body);
        if (cls == NULL || (cls != g_request && cls != g_response) ||
            (expected != Py_None && cls != expected)) {
            return decline();
        }
    }
    else if (expected == g_request || expected == g_response) {
        cls = expected;
    }
    else {
        Py_RETURN_NONE;
    }
    PyObject *plan = plan_of(cls);
    if (plan == NULL) {
        return decline();
    }
    ctx.streams = PyList_New(0);
    if (ctx.streams == NULL) {
        return NULL;
    }
    Py_INCREF(body);
    PyObject *message = dec_object(&ctx, plan, body, 1);
    Py_DECREF(body);
    if (message == NULL) {
        Py_DECREF(ctx.streams);
        return decline();
    }
    return Py_BuildValue("(NN)", message, ctx.streams);
}

/* --- configuration -------------------------------------------------------------------- */

static int
check_descriptor(PyObject *o, int settable, const char *what)
{
    if (Py_TYPE(o)->tp_descr_get == NULL || (settable && Py_TYPE(o)->tp_descr_set == NULL)) {
        PyErr_Format(PyExc_TypeError, "%s must be a slot descriptor", what);
        return -1;
    }
    return 0;
}

static void
store(PyObject **target, PyObject *value)
{
    Py_XINCREF(value);
    Py_XSETREF(*target, value);
}

static PyObject *
codec_configure_values(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"int64", "uuid", "uuid_int", "uuid_is_safe", "safe_unknown",
                               "utc", "int_enum", NULL};
    PyObject *int64, *uuid, *uuid_int, *uuid_is_safe, *safe_unknown, *utc, *int_enum;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!OOOOO!:configure_values", keywords,
                                     &PyType_Type, &int64, &PyType_Type, &uuid, &uuid_int,
                                     &uuid_is_safe, &safe_unknown, &utc, &PyType_Type,
                                     &int_enum)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)int64, &PyLong_Type)) {
        PyErr_SetString(PyExc_TypeError, "int64 must be an int subclass");
        return NULL;
    }
    int fast_uuid = uuid_int != Py_None && uuid_is_safe != Py_None;
    if (fast_uuid && (check_descriptor(uuid_int, 1, "uuid_int") < 0 ||
                      check_descriptor(uuid_is_safe, 1, "uuid_is_safe") < 0)) {
        return NULL;
    }
    if (!PyTZInfo_Check(utc)) {
        PyErr_SetString(PyExc_TypeError, "utc must be a tzinfo");
        return NULL;
    }
    store(&g_int64, int64);
    store(&g_uuid, uuid);
    store(&g_uuid_int, fast_uuid ? uuid_int : NULL);
    store(&g_uuid_is_safe, fast_uuid ? uuid_is_safe : NULL);
    store(&g_safe_unknown, safe_unknown);
    store(&g_utc, utc);
    store(&g_int_enum, int_enum);
    values_configured = 1;
    Py_RETURN_NONE;
}

static PyObject *
codec_configure_objects(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"timespan", "timespan_ticks", "timespan_parse", "datastream",
                               "request", "response", "plans", "plan_for", "require_aware",
                               NULL};
    PyObject *timespan, *ticks, *parse, *datastream, *request, *response, *plans, *plan_for;
    PyObject *require_aware;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO!O!O!O!OO:configure_objects", keywords,
                                     &PyType_Type, &timespan, &ticks, &parse, &PyType_Type,
                                     &datastream, &PyType_Type, &request, &PyType_Type, &response,
                                     &PyDict_Type, &plans, &plan_for, &require_aware)) {
        return NULL;
    }
    if (check_descriptor(ticks, 0, "timespan_ticks") < 0) {
        return NULL;
    }
    store(&g_timespan, timespan);
    store(&g_timespan_ticks, ticks);
    store(&g_timespan_parse, parse);
    store(&g_datastream, datastream);
    store(&g_request, request);
    store(&g_response, response);
    store(&g_plans, plans);
    store(&g_plan_for, plan_for);
    store(&g_require_aware, require_aware);
    objects_configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef codec_methods[] = {
    {"configure_values", (PyCFunction)(void (*)(void))codec_configure_values,
     METH_VARARGS | METH_KEYWORDS, "Hand the core the value types of bson.py."},
    {"configure_objects", (PyCFunction)(void (*)(void))codec_configure_objects,
     METH_VARARGS | METH_KEYWORDS, "Hand the core the classes and plans of serializer.py."},
    {"encode_document", codec_encode_document, METH_VARARGS,
     "encode_document(doc, max_depth) -> bytes, or None to use the pure code."},
    {"decode_document", codec_decode_document, METH_VARARGS,
     "decode_document(data, max_message_bytes, max_depth, max_string_bytes) -> dict, or None."},
    {"encode_message", codec_encode_message, METH_VARARGS,
     "encode_message(message, max_depth) -> (bytes, streams), or None."},
    {"decode_envelope", codec_decode_envelope, METH_VARARGS,
     "decode_envelope(tree, names, expected, run_validators) -> (message, streams), or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, "_codec",
    "The compiled core of the Halibut codec; see tentacle.halibut.accel.", -1, codec_methods,
};

PyMODINIT_FUNC
PyInit__codec(void)
{
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) {
        return NULL;
    }
    s_utcoffset = PyUnicode_InternFromString("utcoffset");
    s_message = PyUnicode_InternFromString("Message");
    s_type = PyUnicode_InternFromString("$type");
    g_empty_tuple = PyTuple_New(0);
    if (!s_utcoffset || !s_message || !s_type || !g_empty_tuple) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&codec_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddStringConstant(module, "SOURCE_SHA256", TENTACLE_CODEC_SOURCE) < 0 ||
        PyModule_AddIntConstant(module, "INTERFACE", 1) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
