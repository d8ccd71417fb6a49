/*
 * h2gen: the native open-loop engine of `uwrt bench` (uwrt.bench.loadgen.native drives it).
 *
 * One thread, non-blocking TCP sockets, epoll (epoll_pwait2's nanosecond timeout wakes it at the
 * next intended send time or deadline; a timerfd where the kernel lacks it), and libnghttp2's
 * client session per connection (serialized with
 * nghttp2_session_mem_send into one write per connection per loop turn). Python precomputes
 * everything that is random or protocol-specific; this program only sends and times:
 *
 *   --schedule FILE   int64 little-endian nanosecond offsets from t0, increasing: request i is
 *                     intended at t0 + offset[i] (Python's seeded Poisson/constant schedule)
 *   --bodies FILE     the request bodies, already framed for gRPC (0x00, 4-byte big-endian
 *                     length, message): u32 count, then per body u32 length, u32 id offset,
 *                     u32 id width, bytes. Request i sends body i % count; when the id offset is
 *                     not 0xffffffff, the `width` ASCII digits at that offset (inside the
 *                     request_id field) are replaced by i, zero-padded, so every request has
 *                     its own id although bodies rotate.
 *   --out FILE        one 52-byte record per request (little-endian, packed):
 *                     int64 intended_ns, int64 sent_ns, int64 done_ns (both -1 if never sent;
 *                     all relative to t0), u32 timing[6] (DecisionResponse.timing: queue,
 *                     featurize, encode, trees, policy, total us), u16 status, u8 flags
 *                     (1 = timing parsed, 2 = adverse outcome), u8 connection index.
 *
 * Latency is done - intended (Python computes it): a late send is charged, no coordinated
 * omission. A request whose deadline (intended + --timeout-us) passed before it could be sent
 * is never sent (status UNSENT). An outstanding request whose deadline passes is cancelled with
 * RST_STREAM(CANCEL) and counted DEADLINE_EXCEEDED, as a gRPC client does; every request carries
 * `grpc-timeout` (its remaining time, microseconds) so the server knows the deadline too.
 *
 * Status: the gRPC status from the trailers (or a Trailers-Only response's headers) when the
 * server sent one, by its code (0-16); otherwise a transport failure, by name:
 *   101 UNAVAILABLE_CONNECT    no connection to the server could be made
 *   102 UNAVAILABLE_CONN_LOST  the connection failed or closed with the request outstanding
 *   103 UNAVAILABLE_GOAWAY     the server's GOAWAY refused the stream (never processed)
 *   104 INTERNAL_NO_GRPC_STATUS  the stream ended with HTTP 200 but no grpc-status
 *   105 INTERNAL_HTTP_STATUS   the stream ended with a non-200 :status and no grpc-status
 *   106 UNKNOWN_GRPC_STATUS    a grpc-status outside 0-16
 *   110+c RST_STREAM_<h2 code name>  the server reset the stream (e.g. RST_STREAM_REFUSED_STREAM)
 * The table goes to stdout in the summary, so Python never keeps a copy.
 *
 * Summary: one JSON line on stdout: t0 (CLOCK_MONOTONIC ns), the CPU this process used from t0
 * to the end (getrusage: user, system), wall seconds, connection counts, the CPUs it ran on,
 * and the status names. `--cpus LIST` pins this process (sched_setaffinity) before it starts;
 * `--fifo` runs it SCHED_FIFO priority 1 (root), so it wakes on time on a busy machine.
 *
 * Build: `make bench-native` (cc, pkg-config libnghttp2; Debian: libnghttp2-dev).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define ST_OK 0
#define ST_DEADLINE_EXCEEDED 4
#define ST_UNSENT 100
#define ST_CONNECT 101
#define ST_CONN_LOST 102
#define ST_GOAWAY 103
#define ST_NO_GRPC_STATUS 104
#define ST_HTTP_STATUS 105
#define ST_UNKNOWN_GRPC 106
#define ST_RST_BASE 110
#define N_H2_CODES 14
#define NO_ID 0xffffffffu
#define SEND_EARLY_NS 20000          /* a request is sent when it is due within 20 us */
#define RECONNECT_NS 100000000LL     /* at most one reconnect attempt per connection per 100 ms */

static const char *GRPC_NAMES[17] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
static const char *H2_NAMES[N_H2_CODES] = {
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
    "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED"};

#pragma pack(push, 1)
typedef struct {
    int64_t intended_ns, sent_ns, done_ns;
    uint32_t timing[6];
    uint16_t status;
    uint8_t flags, conn;
} record_t;
#pragma pack(pop)

typedef struct {
    const uint8_t *data;
    uint32_t len, id_off, id_width;
} body_t;

typedef struct {                     /* per-request state while it is in flight */
    int32_t stream_id;
    int16_t grpc_status;             /* -1 until a grpc-status header arrives */
    int16_t http_status;
    uint32_t body_pos;               /* bytes of the body handed to nghttp2 so far */
    uint8_t done;
    uint8_t *resp;                   /* response bytes (only with --parse-timing) */
    uint32_t resp_len, resp_cap;
} req_t;

enum { C_DOWN = 0, C_UP = 1, C_DRAINING = 2 };

typedef struct {
    int idx, fd, state;
    nghttp2_session *s;
    uint8_t *out;                    /* serialized frames not yet written */
    size_t out_len, out_cap, out_off;
    int want_out;                    /* EPOLLOUT armed */
    int64_t retry_at;
    long streams_open;
} conn_t;

/* ---- globals (one thread) ------------------------------------------------------------------- */
static int64_t *sched_ns;
static size_t n_req;
static body_t *bodies;
static size_t n_bodies;
static record_t *recs;
static req_t *reqs;
static conn_t *conns;
static int n_conn = 1;
static int64_t t0_abs, timeout_ns = 1000000000LL;
static int parse_timing = 0, epfd = -1, tfd = -1;
static struct sockaddr_storage addr;
static socklen_t addr_len;
static char authority[300], path[512] = "/uwrt.v1.Underwriting/Decide", label[200] = "native";
static nghttp2_nv extra_nv[32];
static int n_extra = 0;
static size_t n_done = 0, n_sent = 0, n_err = 0, n_unsent = 0;
static size_t next_req = 0, head_req = 0;  /* next to send; oldest that may still be in flight */
static int64_t duration_ns = 0;
static long connects = 0, connect_failures = 0, conn_lost = 0, goaways = 0;
static int progress = 0;
static int use_pwait2 = 1;
static int fifo = 0;                 /* epoll_pwait2 (Linux >= 5.11); else a timerfd */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "h2gen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static uint8_t *read_file(const char *fn, size_t *len) {
    FILE *f = fopen(fn, "rb");
    if (!f) die("cannot open %s: %s", fn, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = xmalloc((size_t)n);
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) die("short read on %s", fn);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* ---- finishing a request ---------------------------------------------------------------------- */

static void finish(size_t i, uint16_t status, int64_t t) {
    req_t *r = &reqs[i];
    if (r->done) return;
    r->done = 1;
    recs[i].status = status;
    recs[i].done_ns = t - t0_abs;
    n_done++;
    if (status != ST_OK) n_err++;
    free(r->resp);
    r->resp = NULL;
    r->resp_len = r->resp_cap = 0;
}

/* Minimal protobuf walk of a DecisionResponse: outcome (field 2) and timing (field 9, fields 1-6). */
static int varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int sh = 0; sh < 64 && *p < end; sh += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << sh;
        if (!(b & 0x80)) { *v = x; return 0; }
    }
    return -1;
}

static int skip_field(const uint8_t **p, const uint8_t *end, int wt) {
    uint64_t v;
    switch (wt) {
    case 0: return varint(p, end, &v);
    case 1: if (end - *p < 8) return -1; *p += 8; return 0;
    case 2: if (varint(p, end, &v) || (uint64_t)(end - *p) < v) return -1; *p += v; return 0;
    case 5: if (end - *p < 4) return -1; *p += 4; return 0;
    default: return -1;
    }
}

static void parse_response(size_t i) {
    req_t *r = &reqs[i];
    if (!r->resp || r->resp_len < 5) return;
    uint32_t mlen = (uint32_t)r->resp[1] << 24 | (uint32_t)r->resp[2] << 16 | (uint32_t)r->resp[3] << 8 | r->resp[4];
    if (r->resp[0] != 0 || mlen > r->resp_len - 5) return;      /* compressed or truncated: no timing */
    const uint8_t *p = r->resp + 5, *end = p + mlen;
    uint32_t timing[6] = {0};
    uint64_t outcome = 0, key, v;
    while (p < end) {
        if (varint(&p, end, &key)) return;
        int fno = (int)(key >> 3), wt = (int)(key & 7);
        if (fno == 2 && wt == 0) {
            if (varint(&p, end, &outcome)) return;
        } else if (fno == 9 && wt == 2) {
            if (varint(&p, end, &v) || (uint64_t)(end - p) < v) return;
            const uint8_t *q = p, *qe = p + v;
            while (q < qe) {
                uint64_t k2, x;
                if (varint(&q, qe, &k2)) return;
                int f2 = (int)(k2 >> 3), w2 = (int)(k2 & 7);
                if (f2 >= 1 && f2 <= 6 && w2 == 0) {
                    if (varint(&q, qe, &x)) return;
                    timing[f2 - 1] = x > 0xffffffffu ? 0xffffffffu : (uint32_t)x;
                } else if (skip_field(&q, qe, w2)) {
                    return;
                }
            }
            p = qe;
        } else if (skip_field(&p, end, wt)) {
            return;
        }
    }
    memcpy(recs[i].timing, timing, sizeof timing);
    recs[i].flags |= 1 | ((outcome == 2 || outcome == 3) ? 2 : 0);   /* DECLINE, COUNTEROFFER */
}

/* ---- nghttp2 callbacks -------------------------------------------------------------------------- */

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *ud) {
    (void)s; (void)flags; (void)ud;
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    size_t i = (size_t)(uintptr_t)nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!i--) return 0;
    req_t *r = &reqs[i];
    char tmp[16];
    size_t n = valuelen < sizeof tmp - 1 ? valuelen : sizeof tmp - 1;
    if (namelen == 11 && !memcmp(name, "grpc-status", 11)) {
        memcpy(tmp, value, n); tmp[n] = 0;
        r->grpc_status = (int16_t)atoi(tmp);
        if (n == 0 || r->grpc_status < 0 || r->grpc_status > 16) r->grpc_status = 1000;
    } else if (namelen == 7 && !memcmp(name, ":status", 7)) {
        memcpy(tmp, value, n); tmp[n] = 0;
        r->http_status = (int16_t)atoi(tmp);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
    (void)flags; (void)ud;
    if (!parse_timing) return 0;
    size_t i = (size_t)(uintptr_t)nghttp2_session_get_stream_user_data(s, sid);
    if (!i--) return 0;
    req_t *r = &reqs[i];
    if (r->done || r->resp_len + len > (1u << 22)) return 0;
    if (r->resp_len + len > r->resp_cap) {
        uint32_t cap = r->resp_cap ? r->resp_cap : 1024;
        while (cap < r->resp_len + len) cap *= 2;
        uint8_t *nb = realloc(r->resp, cap);
        if (!nb) return 0;
        r->resp = nb;
        r->resp_cap = cap;
    }
    memcpy(r->resp + r->resp_len, data, len);
    r->resp_len += (uint32_t)len;
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t error_code, void *ud) {
    conn_t *c = ud;
    size_t i = (size_t)(uintptr_t)nghttp2_session_get_stream_user_data(s, sid);
    c->streams_open--;
    if (!i--) return 0;
    req_t *r = &reqs[i];
    if (r->done) return 0;                                        /* already cancelled at its deadline */
    uint16_t st;
    if (r->grpc_status >= 0) {
        st = r->grpc_status == 1000 ? ST_UNKNOWN_GRPC : (uint16_t)r->grpc_status;
        if (st == ST_OK && parse_timing) parse_response(i);
    } else if (error_code == NGHTTP2_REFUSED_STREAM && c->state == C_DRAINING) {
        st = ST_GOAWAY;
    } else if (error_code != NGHTTP2_NO_ERROR) {
        st = (uint16_t)(ST_RST_BASE + (error_code < N_H2_CODES ? error_code : NGHTTP2_INTERNAL_ERROR));
    } else {
        st = r->http_status == 200 ? ST_NO_GRPC_STATUS : ST_HTTP_STATUS;
    }
    finish(i, st, now_ns());
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
    (void)s;
    conn_t *c = ud;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        goaways++;
        if (c->state == C_UP) c->state = C_DRAINING;
    }
    return 0;
}

static ssize_t read_body(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                         nghttp2_data_source *src, void *ud) {
    (void)s; (void)sid; (void)ud;
    size_t i = (size_t)src->ptr - 1;
    req_t *r = &reqs[i];
    const body_t *b = &bodies[i % n_bodies];
    size_t n = b->len - r->body_pos;
    if (n > length) n = length;
    memcpy(buf, b->data + r->body_pos, n);
    if (b->id_off != NO_ID) {                                     /* patch the request's own id digits */
        uint64_t v = i;
        for (uint32_t k = b->id_width; k-- > 0;) {
            uint32_t pos = b->id_off + k;
            if (pos >= r->body_pos && pos < r->body_pos + n) buf[pos - r->body_pos] = (uint8_t)('0' + v % 10);
            v /= 10;
        }
    }
    r->body_pos += (uint32_t)n;
    if (r->body_pos >= b->len) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* ---- connections ---------------------------------------------------------------------------------- */

static void conn_fail(conn_t *c, uint16_t status);

static void watch(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static int conn_open(conn_t *c) {
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, addr_len) < 0) {   /* loopback: immediate */
        close(fd);
        connect_failures++;
        c->retry_at = now_ns() + RECONNECT_NS;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    int rv = nghttp2_session_client_new(&c->s, cb, c);
    nghttp2_session_callbacks_del(cb);
    if (rv) die("nghttp2_session_client_new: %s", nghttp2_strerror(rv));
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24}};
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 1 << 28);
    c->fd = fd;
    c->state = C_UP;
    c->out_len = c->out_off = 0;
    c->streams_open = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    c->want_out = 0;
    connects++;
    return 0;
}

/* Serialize what the session wants to send and write it; returns -1 if the connection died. */
static int conn_flush(conn_t *c) {
    if (c->state == C_DOWN) return 0;
    for (;;) {
        if (c->out_off == c->out_len) {
            c->out_len = c->out_off = 0;
            for (;;) {
                const uint8_t *data;
                ssize_t n = nghttp2_session_mem_send(c->s, &data);
                if (n < 0) { conn_fail(c, ST_CONN_LOST); return -1; }
                if (n == 0) break;
                if (c->out_len + (size_t)n > c->out_cap) {
                    size_t cap = c->out_cap ? c->out_cap : 65536;
                    while (cap < c->out_len + (size_t)n) cap *= 2;
                    c->out = realloc(c->out, cap);
                    if (!c->out) die("out of memory");
                    c->out_cap = cap;
                }
                memcpy(c->out + c->out_len, data, (size_t)n);
                c->out_len += (size_t)n;
                if (c->out_len >= (1 << 20)) break;
            }
            if (c->out_len == 0) break;
        }
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->want_out) watch(c, 1);
                return 0;
            }
            if (errno == EINTR) continue;
            conn_fail(c, ST_CONN_LOST);
            return -1;
        }
        c->out_off += (size_t)w;
    }
    if (c->want_out) watch(c, 0);
    if (c->state == C_DRAINING && !nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s))
        conn_fail(c, ST_GOAWAY);                                  /* drained: close, reconnect lazily */
    return 0;
}

/* The connection is gone: every request still outstanding on it fails with `status`. */
static void conn_fail(conn_t *c, uint16_t status) {
    if (c->state == C_DOWN) return;
    if (status == ST_CONN_LOST) conn_lost++;
    c->state = C_DOWN;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    nghttp2_session *s = c->s;
    c->s = NULL;
    int64_t t = now_ns();
    for (size_t i = head_req; i < next_req; i++)                  /* rare: a linear scan is fine */
        if (recs[i].conn == c->idx && recs[i].sent_ns >= 0 && !reqs[i].done) finish(i, status, t);
    nghttp2_session_del(s);
    c->retry_at = t + RECONNECT_NS;
}

static void conn_read(conn_t *c) {
    static uint8_t buf[1 << 16];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            ssize_t rv = nghttp2_session_mem_recv(c->s, buf, (size_t)n);
            if (rv < 0) { conn_fail(c, ST_CONN_LOST); return; }
            if ((size_t)n < sizeof buf) return;                   /* drained (level-triggered: epoll says if more) */
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n < 0 && errno == EINTR) continue;
        conn_fail(c, ST_CONN_LOST);                                /* EOF or error */
        return;
    }
}

/* ---- sending -------------------------------------------------------------------------------------- */

static int rr = 0;

static void dispatch(size_t i, int64_t now) {
    record_t *rec = &recs[i];
    int64_t deadline = t0_abs + sched_ns[i] + timeout_ns;
    if (now >= deadline) {                                        /* its deadline passed before it could go */
        reqs[i].done = 1;
        rec->status = ST_UNSENT;
        n_done++;
        n_unsent++;
        return;
    }
    rec->sent_ns = now - t0_abs;
    n_sent++;
    char tmo[24];
    int64_t left_us = (deadline - now) / 1000;
    if (left_us < 1) left_us = 1;
    if (left_us <= 99999999) snprintf(tmo, sizeof tmo, "%" PRId64 "u", left_us);
    else snprintf(tmo, sizeof tmo, "%" PRId64 "m", left_us / 1000 > 99999999 ? 99999999 : left_us / 1000);
#define NV(n, v, f) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), (f)}
    nghttp2_nv nv[8 + 32] = {
        NV(":method", "POST", NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV(":scheme", "http", NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV(":path", path, NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV(":authority", authority, NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV("content-type", "application/grpc", NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV("te", "trailers", NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV("user-agent", "uwrt-h2gen/1", NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE),
        NV("grpc-timeout", tmo, NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_INDEX),
    };
#undef NV
    memcpy(nv + 8, extra_nv, (size_t)n_extra * sizeof(nghttp2_nv));
    nghttp2_data_provider prd = {.source.ptr = (void *)(uintptr_t)(i + 1), .read_callback = read_body};
    for (int tries = 0; tries < n_conn; tries++) {
        conn_t *c = &conns[(rr + tries) % n_conn];
        if (c->state == C_DOWN && now >= c->retry_at) conn_open(c);
        if (c->state != C_UP) continue;
        int32_t sid = nghttp2_submit_request(c->s, NULL, nv, (size_t)(8 + n_extra), &prd, (void *)(uintptr_t)(i + 1));
        if (sid < 0) continue;
        reqs[i].stream_id = sid;
        rec->conn = (uint8_t)c->idx;
        c->streams_open++;
        rr = (rr + tries + 1) % n_conn;
        return;
    }
    rec->conn = 0xff;
    finish(i, ST_CONNECT, now);                                   /* no connection would take it */
}

/* ---- main loop ------------------------------------------------------------------------------------- */

static void arm(int64_t at_abs) {
    struct itimerspec its = {0};
    if (at_abs > 0) {
        its.it_value.tv_sec = at_abs / 1000000000LL;
        its.it_value.tv_nsec = at_abs % 1000000000LL;
    }
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);        /* 0 disarms */
}

static void show_progress(int64_t now, int final) {
    static int64_t last = 0;
    static int tty = -1;
    if (!progress) return;
    if (tty < 0) {
        tty = isatty(2);
        last = t0_abs - (tty ? 500000000LL : 0);                  /* like the Python engine: every 0.5 s / 5 s */
    }
    if (!final && (now < t0_abs || now - last < (tty ? 500000000LL : 5000000000LL))) return;
    last = now;
    if (final) {
        if (tty) fprintf(stderr, "\r\033[K");
        return;
    }
    double el = now > t0_abs ? (double)(now - t0_abs) / 1e9 : 0.0;
    size_t finished = n_done - n_unsent;                          /* sent and answered or failed */
    fprintf(stderr, "%s[%s] %5.1f/%.0fs sent %zu (%.0f/s) ok %zu err %zu in flight %zu%s", tty ? "\r\033[K" : "",
            label, el, (double)duration_ns / 1e9, n_sent, el > 0 ? (double)n_sent / el : 0.0, finished - n_err, n_err,
            n_sent - finished, tty ? "" : "\n");
}

static void usage(void) {
    fprintf(stderr, "usage: h2gen --target HOST:PORT --schedule F --bodies F --out F [--path P] [--connections N]\n"
                    "             [--timeout-us T] [--start-delay-us D] [--parse-timing] [--metadata K=V]...\n"
                    "             [--cpus LIST] [--fifo] [--progress] [--label L] [--duration-us D]\n");
    exit(2);
}

static void parse_cpus(const char *spec, cpu_set_t *set) {
    CPU_ZERO(set);
    char *s = strdup(spec), *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *dash = strchr(tok, '-');
        int a = atoi(tok), b = dash ? atoi(dash + 1) : a;
        for (int k = a; k <= b; k++) CPU_SET(k, set);
    }
    free(s);
}

int main(int argc, char **argv) {
    const char *target = NULL, *sched_fn = NULL, *bodies_fn = NULL, *out_fn = NULL, *cpus = NULL;
    int64_t start_delay_ns = 20000000LL;
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a];
        const char *v = a + 1 < argc ? argv[a + 1] : NULL;
        if (!strcmp(k, "--parse-timing")) { parse_timing = 1; continue; }
        if (!strcmp(k, "--progress")) { progress = 1; continue; }
        if (!strcmp(k, "--fifo")) { fifo = 1; continue; }
        if (!v) usage();
        a++;
        if (!strcmp(k, "--target")) target = v;
        else if (!strcmp(k, "--schedule")) sched_fn = v;
        else if (!strcmp(k, "--bodies")) bodies_fn = v;
        else if (!strcmp(k, "--out")) out_fn = v;
        else if (!strcmp(k, "--path")) snprintf(path, sizeof path, "%s", v);
        else if (!strcmp(k, "--label")) snprintf(label, sizeof label, "%s", v);
        else if (!strcmp(k, "--connections")) n_conn = atoi(v);
        else if (!strcmp(k, "--timeout-us")) timeout_ns = atoll(v) * 1000LL;
        else if (!strcmp(k, "--start-delay-us")) start_delay_ns = atoll(v) * 1000LL;
        else if (!strcmp(k, "--duration-us")) duration_ns = atoll(v) * 1000LL;
        else if (!strcmp(k, "--cpus")) cpus = v;
        else if (!strcmp(k, "--metadata")) {
            const char *eq = strchr(v, '=');
            if (!eq || n_extra >= 32) usage();
            extra_nv[n_extra].name = (uint8_t *)strndup(v, (size_t)(eq - v));
            extra_nv[n_extra].namelen = (size_t)(eq - v);
            extra_nv[n_extra].value = (uint8_t *)strdup(eq + 1);
            extra_nv[n_extra].valuelen = strlen(eq + 1);
            extra_nv[n_extra].flags = NGHTTP2_NV_FLAG_NONE;
            n_extra++;
        } else usage();
    }
    if (!target || !sched_fn || !bodies_fn || !out_fn || n_conn < 1 || n_conn > 250 || timeout_ns <= 0) usage();
    if (cpus) {
        cpu_set_t set;
        parse_cpus(cpus, &set);
        if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity(%s): %s", cpus, strerror(errno));
    }
    if (fifo) {                                                   /* wake on time even on a loaded machine */
        struct sched_param sp = {.sched_priority = 1};
        if (sched_setscheduler(0, SCHED_FIFO, &sp)) die("--fifo: sched_setscheduler: %s", strerror(errno));
    }
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1000UL);                            /* 1 us timer slack */

    /* target */
    char host[256], port[16];
    const char *colon = strrchr(target, ':');
    if (!colon || colon == target) die("target must be HOST:PORT, got %s", target);
    size_t hl = (size_t)(colon - target);
    if (target[0] == '[' && hl >= 2 && target[hl - 1] == ']') snprintf(host, sizeof host, "%.*s", (int)hl - 2, target + 1);
    else snprintf(host, sizeof host, "%.*s", (int)hl, target);
    snprintf(port, sizeof port, "%s", colon + 1);
    snprintf(authority, sizeof authority, "%s", target);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr) die("cannot resolve %s: %s", target, gai_strerror(gr));
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addr_len = ai->ai_addrlen;
    freeaddrinfo(ai);

    /* inputs */
    size_t len;
    uint8_t *sb = read_file(sched_fn, &len);
    if (len % 8) die("%s: not a whole number of int64", sched_fn);
    n_req = len / 8;
    sched_ns = (int64_t *)sb;                                      /* little-endian host assumed (x86-64, arm64) */
    uint8_t *bb = read_file(bodies_fn, &len);
    if (len < 4) die("%s: too short", bodies_fn);
    n_bodies = rd32(bb);
    if (!n_bodies) die("%s: no bodies", bodies_fn);
    bodies = xmalloc(n_bodies * sizeof *bodies);
    size_t off = 4;
    for (size_t k = 0; k < n_bodies; k++) {
        if (off + 12 > len) die("%s: truncated", bodies_fn);
        bodies[k].len = rd32(bb + off);
        bodies[k].id_off = rd32(bb + off + 4);
        bodies[k].id_width = rd32(bb + off + 8);
        off += 12;
        if (off + bodies[k].len > len) die("%s: truncated body %zu", bodies_fn, k);
        if (bodies[k].id_off != NO_ID && (uint64_t)bodies[k].id_off + bodies[k].id_width > bodies[k].len)
            die("%s: id digits outside body %zu", bodies_fn, k);
        bodies[k].data = bb + off;
        off += bodies[k].len;
    }
    recs = xmalloc(n_req * sizeof *recs);
    reqs = xmalloc(n_req * sizeof *reqs);
    for (size_t i = 0; i < n_req; i++) {
        recs[i].intended_ns = sched_ns[i];
        recs[i].sent_ns = recs[i].done_ns = -1;
        reqs[i].grpc_status = -1;
        if (i && sched_ns[i] < sched_ns[i - 1]) die("%s: offsets must not decrease", sched_fn);
    }

    /* connections, then t0 */
    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);
    conns = xmalloc((size_t)n_conn * sizeof *conns);
    int up = 0;
    for (int k = 0; k < n_conn; k++) {
        conns[k].idx = k;
        conns[k].fd = -1;
        if (conn_open(&conns[k]) == 0) { up++; conn_flush(&conns[k]); }
    }
    if (!up) fprintf(stderr, "h2gen: warning: cannot connect to %s (every request will fail UNAVAILABLE_CONNECT)\n", target);
    t0_abs = now_ns() + start_delay_ns;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);

    /* the loop: send what is due, cancel what expired, flush, sleep until the next event */
    struct epoll_event evs[64];
    while (n_done < n_req) {
        int64_t now = now_ns();
        int sent_any = 0;
        while (next_req < n_req && t0_abs + sched_ns[next_req] <= now + SEND_EARLY_NS) {
            dispatch(next_req++, now);
            sent_any = 1;
        }
        while (head_req < next_req && reqs[head_req].done) head_req++;
        for (size_t i = head_req; i < next_req && t0_abs + sched_ns[i] + timeout_ns <= now; i++) {
            if (reqs[i].done) continue;
            conn_t *c = &conns[recs[i].conn];
            if (c->state != C_DOWN && c->s) nghttp2_submit_rst_stream(c->s, NGHTTP2_FLAG_NONE, reqs[i].stream_id, NGHTTP2_CANCEL);
            finish(i, ST_DEADLINE_EXCEEDED, now);
        }
        while (head_req < next_req && reqs[head_req].done) head_req++;
        for (int k = 0; k < n_conn; k++)
            if (conns[k].state != C_DOWN && (sent_any || nghttp2_session_want_write(conns[k].s))) conn_flush(&conns[k]);
        show_progress(now, 0);
        if (n_done >= n_req) break;
        int64_t wake = 0;
        if (next_req < n_req) wake = t0_abs + sched_ns[next_req] - SEND_EARLY_NS / 2;
        if (head_req < next_req) {
            int64_t d = t0_abs + sched_ns[head_req] + timeout_ns;
            if (!wake || d < wake) wake = d;
        }
        if (progress) {
            int64_t p = now + 500000000LL;
            if (!wake || p < wake) wake = p;
        }
        if (wake && wake <= now_ns()) continue;
        int ne;
        if (use_pwait2) {                                        /* ns timeout: no timer syscalls per turn */
            int64_t left = wake ? wake - now_ns() : -1;
            if (wake && left < 0) left = 0;
            struct timespec ts = {.tv_sec = left / 1000000000LL, .tv_nsec = left % 1000000000LL};
            ne = epoll_pwait2(epfd, evs, 64, wake ? &ts : NULL, NULL);
            if (ne < 0 && errno == ENOSYS) { use_pwait2 = 0; continue; }
        } else {
            arm(wake);
            ne = epoll_wait(epfd, evs, 64, -1);
        }
        if (ne < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < ne; e++) {
            conn_t *c = evs[e].data.ptr;
            if (!c) {
                uint64_t x;
                if (read(tfd, &x, sizeof x) < 0) { /* spurious: nothing to do */ }
                continue;
            }
            if (c->state == C_DOWN) continue;
            if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_read(c);
            if (c->state != C_DOWN) conn_flush(c);
        }
    }
    int64_t t_end = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    show_progress(t_end, 1);
    for (int k = 0; k < n_conn; k++)
        if (conns[k].state != C_DOWN) {
            nghttp2_session_terminate_session(conns[k].s, NGHTTP2_NO_ERROR);
            conn_flush(&conns[k]);
        }

    FILE *f = fopen(out_fn, "wb");
    if (!f || fwrite(recs, sizeof *recs, n_req, f) != n_req || fclose(f)) die("cannot write %s", out_fn);
    double ucpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double scpu = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    cpu_set_t set;
    sched_getaffinity(0, sizeof set, &set);
    printf("{\"t0_ns\": %" PRId64 ", \"end_ns\": %" PRId64 ", \"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"requests\": %zu, "
           "\"sent\": %zu, \"connections\": %d, \"connects\": %ld, \"connect_failures\": %ld, \"conn_lost\": %ld, "
           "\"goaways\": %ld, \"nghttp2\": \"%s\", \"cpus\": [",
           t0_abs, t_end - t0_abs, ucpu, scpu, n_req, n_sent, n_conn, connects, connect_failures, conn_lost, goaways,
           nghttp2_version(0)->version_str);
    int first = 1;
    for (int k = 0; k < CPU_SETSIZE; k++)
        if (CPU_ISSET(k, &set)) { printf(first ? "%d" : ", %d", k); first = 0; }
    printf("], \"status_names\": {");
    for (int k = 0; k < 17; k++) printf("\"%d\": \"%s\", ", k, GRPC_NAMES[k]);
    printf("\"%d\": \"UNSENT\", \"%d\": \"UNAVAILABLE_CONNECT\", \"%d\": \"UNAVAILABLE_CONN_LOST\", "
           "\"%d\": \"UNAVAILABLE_GOAWAY\", \"%d\": \"INTERNAL_NO_GRPC_STATUS\", \"%d\": \"INTERNAL_HTTP_STATUS\", "
           "\"%d\": \"UNKNOWN_GRPC_STATUS\"",
           ST_UNSENT, ST_CONNECT, ST_CONN_LOST, ST_GOAWAY, ST_NO_GRPC_STATUS, ST_HTTP_STATUS, ST_UNKNOWN_GRPC);
    for (int k = 0; k < N_H2_CODES; k++) printf(", \"%d\": \"RST_STREAM_%s\"", ST_RST_BASE + k, H2_NAMES[k]);
    printf("}}\n");
    return 0;
}
