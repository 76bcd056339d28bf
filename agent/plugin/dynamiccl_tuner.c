/*
 * DynamICCL's NCCL tuner plugin.
 *
 * NCCL asks a tuner plugin, for every collective it plans, which algorithm,
 * protocol and channel count to use: getCollInfo() receives the collective,
 * its byte count and NCCL's cost table per (algorithm, protocol); the plugin
 * makes one pair the cheapest (cost 0) and may set the channel count. This
 * plugin answers from per-size rules that DynamICCL's node agent keeps
 * current in a file, and re-reads that file while the job runs.
 *
 * The rules file (NCCL_TUNER_CONFIG_FILE)
 * ---------------------------------------
 * Rule lines use the CSV format of NCCL's example tuner plugin:
 *   collective,min_bytes,max_bytes,algorithm,protocol,channels,nNodes,nRanks[,numPipeOps[,regBuff]]
 * -1 means "any" (nNodes, nRanks, numPipeOps, regBuff) or "NCCL decides"
 * (channels); regBuff 0 means "buffers not registered". As in NCCL's example
 * plugin, the first matching rule whose pair NCCL offers for the call wins: a
 * matching rule whose pair NCCL marks unavailable, or that names an algorithm
 * or protocol this plugin does not know, gives way to the next matching rule.
 * '#' starts a comment. Rules are grouped in
 * sections, each opened by a header line
 *   # dynamiccl: version=V from_call=K
 * Rules before the first header form section version 0 from call 0, so a
 * plain rule file (the example plugin's format) is a one-section schedule.
 *
 * Agreement: every rank of a communicator makes the same choice per call
 * -----------------------------------------------------------------------
 * NCCL hangs when ranks of one communicator run different algorithms or
 * protocols for the same call, and ranks on different nodes see a new file
 * at different moments. So a change never takes effect "when this rank
 * notices it"; it takes effect at a call index written in the file:
 *  1. Each communicator counts its getCollInfo calls: 0, 1, 2, ... Every rank
 *     of a communicator plans the same sequence of collectives, so the count
 *     is the same on every rank for the same call.
 *  2. For call index c, the rules in force are those of the section with the
 *     highest version among the sections this communicator knows whose
 *     from_call <= c; none: NCCL decides. This depends only on the file's
 *     content, never on when it was read.
 *  3. Versions only grow and a published section never changes. A new
 *     section is appended with from_call ahead of the highest call index any
 *     communicator has reported (see the report below) by a safety margin,
 *     so every rank reads it before reaching from_call. Older sections stay
 *     in the file: a rank that missed a file version (or a communicator
 *     created later, whose count starts at 0) still learns every switch.
 *  4. A rank that first sees a section after its from_call has passed is
 *     late: some of its calls already ran under other rules than its peers'.
 *     It switches at its next call (the shortest possible mismatch), warns
 *     through NCCL's logger and counts it in the report ("late"), so the
 *     writer can widen its margin. The writer's margin is what prevents it.
 *  5. A deleted, unreadable or malformed file changes nothing in force: what
 *     was learned stays (noticing a deletion is a per-rank event, so acting
 *     on it would break agreement). A section with a malformed rule line
 *     means NCCL decides every call while it is in force; a header that
 *     does not parse skips its section. At init, no usable file: NCCL decides.
 * The Python side of the protocol is dynamiccl.agent.plugin.rules.
 *
 * Never failing NCCL
 * ------------------
 * getCollInfo() always returns ncclSuccess. A call that no applicable rule
 * matches leaves the table untouched: NCCL's own choice. A rule passed over
 * (unknown name, or a pair NCCL marks NCCL_ALGO_PROTO_IGNORE) is logged once
 * per communicator through the logFunction NCCL passes to init (NULL is
 * tolerated). With DYNAMICCL_TUNER_LOG_RULES=1 every rule line is logged as it
 * was understood, and every refused line with the reason (what `dynamiccl
 * plugin check` prints).
 *
 * Cost on NCCL's call path: a counter decrement per call; every
 * DYNAMICCL_TUNER_CHECK_CALLS calls (64) one coarse clock read; at most every
 * DYNAMICCL_TUNER_RELOAD_MS (200; 0: at every check; -1: read once at init)
 * one stat() of the file, and a read only when its inode, size or mtime
 * changed (then only sections newer than those known are parsed).
 *
 * Report of what ran: every DYNAMICCL_TUNER_REPORT_MS (1000; 0: at every
 * check; -1: never) at most, and at finalize, the process rewrites
 * <rules file>.chosen.<pid>.json
 * (a temp file created with O_EXCL|O_NOFOLLOW, then renamed: a planted file or
 * symlink is never written through): per communicator its call count, the version in force
 * and, per (collective, log2 size class), the last choice made (rule or
 * NCCL's cost-model pick) and for how many calls in a row it was made.
 *
 * ABI: NCCL's tuner interface v3 to v7 (declared below from NCCL's headers; no
 * NCCL source is needed to build), exported as ncclTunerPlugin_v3 ...
 * ncclTunerPlugin_v7. NCCL takes the newest it knows. v7 (NCCL 2.32.6) has
 * v6's function table; only its constants struct (5 compute capabilities)
 * differs, and this plugin reads no constants.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---------------- NCCL's tuner ABI (values as in NCCL's headers) ---------------- */

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
} ncclResult_t;

typedef enum {
  NCCL_LOG_NONE = 0,
  NCCL_LOG_VERSION = 1,
  NCCL_LOG_WARN = 2,
  NCCL_LOG_INFO = 3,
  NCCL_LOG_ABORT = 4,
  NCCL_LOG_TRACE = 5,
} ncclDebugLogLevel;

#define NCCL_TUNING 0x40UL

typedef void (*ncclDebugLogger_t)(ncclDebugLogLevel level, unsigned long flags, const char *file,
                                  int line, const char *fmt, ...);

typedef enum {
  ncclFuncBroadcast = 0,
  ncclFuncReduce = 1,
  ncclFuncAllGather = 2,
  ncclFuncReduceScatter = 3,
  ncclFuncAllReduce = 4,
} ncclFunc_t;

#define NUM_COLLS 5 /* the collectives NCCL consults the tuner for */
#define ALGO_PROTO_IGNORE (-1.0f)

/* v5+ pass NVLink-domain info and NCCL's tuning constants; this plugin reads neither. */
typedef struct ncclNvlDomainInfo_v5 ncclNvlDomainInfo_v5_t;
typedef struct ncclTunerConstants_v5 ncclTunerConstants_v5_t;
typedef struct ncclTunerConstants_v7 ncclTunerConstants_v7_t; /* NCCL_NUM_COMPCAPS_V7 = 5 */

typedef struct {
  const char *name;
  ncclResult_t (*init)(size_t nRanks, size_t nNodes, ncclDebugLogger_t logFunction, void **context);
  ncclResult_t (*getCollInfo)(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                              float **collCostTable, int numAlgo, int numProto, int *nChannels);
  ncclResult_t (*destroy)(void *context);
} ncclTuner_v3_t;

typedef struct {
  const char *name;
  ncclResult_t (*init)(size_t nRanks, size_t nNodes, ncclDebugLogger_t logFunction, void **context);
  ncclResult_t (*getCollInfo)(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                              float **collCostTable, int numAlgo, int numProto, int regBuff,
                              int *nChannels);
  ncclResult_t (*destroy)(void *context);
} ncclTuner_v4_t;

typedef struct {
  const char *name;
  ncclResult_t (*init)(void **context, uint64_t commId, size_t nRanks, size_t nNodes,
                       ncclDebugLogger_t logFunction, ncclNvlDomainInfo_v5_t *nvlDomainInfo,
                       ncclTunerConstants_v5_t *constants);
  ncclResult_t (*getCollInfo)(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                              float **collCostTable, int numAlgo, int numProto, int regBuff,
                              int *nChannels);
  ncclResult_t (*finalize)(void *context);
} ncclTuner_v5_t;

typedef struct {
  const char *name;
  ncclResult_t (*init)(void **context, uint64_t commId, size_t nRanks, size_t nNodes,
                       ncclDebugLogger_t logFunction, ncclNvlDomainInfo_v5_t *nvlDomainInfo,
                       ncclTunerConstants_v5_t *constants);
  ncclResult_t (*getCollInfo)(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                              float **collCostTable, int numAlgo, int numProto, int regBuff,
                              int *nChannels);
  ncclResult_t (*finalize)(void *context);
  /* Optional: NULL keeps NCCL's chunk size. */
  ncclResult_t (*getChunkSize)(void *context, ncclFunc_t collType, size_t nBytes, int algo,
                               int proto, int nChannels, size_t *chunkSize);
} ncclTuner_v6_t;

typedef struct {
  const char *name;
  ncclResult_t (*init)(void **context, uint64_t commId, size_t nRanks, size_t nNodes,
                       ncclDebugLogger_t logFunction, ncclNvlDomainInfo_v5_t *nvlDomainInfo,
                       ncclTunerConstants_v7_t *constants);
  ncclResult_t (*getCollInfo)(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                              float **collCostTable, int numAlgo, int numProto, int regBuff,
                              int *nChannels);
  ncclResult_t (*finalize)(void *context);
  ncclResult_t (*getChunkSize)(void *context, ncclFunc_t collType, size_t nBytes, int algo,
                               int proto, int nChannels, size_t *chunkSize);
} ncclTuner_v7_t;

/* ---------------- names ---------------- */

static const char *const COLL_NAMES[NUM_COLLS] = {"broadcast", "reduce", "allgather",
                                                  "reducescatter", "allreduce"};
/* NCCL's algorithm and protocol indices into the cost table. */
static const char *const ALGO_NAMES[] = {"tree", "ring", "collnet_direct", "collnet_chain",
                                         "nvls", "nvls_tree", "pat"};
static const char *const PROTO_NAMES[] = {"ll", "ll128", "simple"};
#define NUM_ALGO_NAMES ((int)(sizeof(ALGO_NAMES) / sizeof(ALGO_NAMES[0])))
#define NUM_PROTO_NAMES ((int)(sizeof(PROTO_NAMES) / sizeof(PROTO_NAMES[0])))

static int name_index(const char *const *names, int n, const char *text) {
  for (int i = 0; i < n; i++)
    if ((names[i][0] | 0x20) == (text[0] | 0x20) && strcasecmp(names[i], text) == 0) return i;
  return -1;
}

/* ---------------- rules, sections, contexts ---------------- */

#define HEADER_TAG "dynamiccl:"
#define MAX_FILE_BYTES (4 << 20)
#define MAX_CHANNELS 255
#define NUM_SIZE_CLASSES 64

typedef struct {
  size_t min_bytes, max_bytes;
  int algo, proto;
  int channels;    /* -1: NCCL decides */
  int pipe_ops;    /* -1: any */
  int reg_buff;    /* -1: any */
} Rule;

typedef struct {
  int64_t version;
  int64_t from_call;
  int broken; /* a rule line did not parse: NCCL decides while this section is in force */
  /* Per collective, in file order, only the rules that can match this communicator
   * (a line naming an unknown algorithm or protocol can never apply: it is left out). */
  Rule *rules[NUM_COLLS];
  int nrules[NUM_COLLS];
  int cap[NUM_COLLS];
} Section;

/* Choices are packed in one word so the report can read them without locks. */
enum { SOURCE_NONE = 0, SOURCE_RULE = 1, SOURCE_NCCL = 2 };

typedef struct {
  uint64_t choice; /* pack_choice() */
  uint64_t calls;  /* consecutive calls with this choice */
} Cell;

enum {
  ONCE_NO_FILE = 1 << 0,
  ONCE_BAD_FILE = 1 << 1,
  ONCE_BAD_HEADER = 1 << 2,
  ONCE_BAD_LINE = 1 << 3,
  ONCE_UNKNOWN_NAME = 1 << 4,
  ONCE_UNAVAILABLE = 1 << 5,
  ONCE_REPORT = 1 << 6,
};

typedef struct Ctx {
  struct Ctx *next; /* live contexts of this process (g_lock) */
  uint64_t serial;
  uint64_t comm_id;
  int has_comm_id;
  size_t nranks, nnodes;
  ncclDebugLogger_t log;
  char path[PATH_MAX];

  uint64_t calls; /* index of the next call; read by the report */
  Section *sections; /* sorted by version; sections[0] is in force when active */
  int nsections, cap_sections;
  int active;            /* 1: sections[0] is in force; 0: none is */
  int64_t max_version;   /* highest version learned (-1: none) */
  uint64_t next_switch;  /* lowest from_call among sections not yet in force */
  int64_t active_version; /* read by the report; -1: none */
  uint64_t late;

  int check_every, countdown;
  int64_t reload_ns, report_ns, last_check_ns;
  int have_stat;
  dev_t dev;
  ino_t ino;
  off_t size;
  struct timespec mtime;
  unsigned once;
  int log_rules; /* DYNAMICCL_TUNER_LOG_RULES=1: log every rule line as understood */

  Cell cells[NUM_COLLS][NUM_SIZE_CLASSES];
} Ctx;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static Ctx *g_contexts;
static uint64_t g_serial;
static int64_t g_last_report_ns;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* ---------------- logging ---------------- */

static void say(const Ctx *ctx, ncclDebugLogLevel level, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Formats here and hands NCCL a format without arguments ('%' doubled), so the
 * message is complete whatever the logger does with variadic arguments. */
static void say(const Ctx *ctx, ncclDebugLogLevel level, int line, const char *fmt, ...) {
  if (ctx == NULL || ctx->log == NULL) return;
  char msg[768], out[1536];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  size_t j = 0;
  static const char prefix[] = "DynamICCL tuner: ";
  memcpy(out, prefix, sizeof(prefix) - 1);
  j = sizeof(prefix) - 1;
  for (size_t i = 0; msg[i] != '\0' && j + 2 < sizeof(out); i++) {
    if (msg[i] == '%') out[j++] = '%';
    out[j++] = msg[i];
  }
  out[j] = '\0';
  ctx->log(level, NCCL_TUNING, "dynamiccl_tuner.c", line, out);
}

/* True the first time `what` happens on this communicator. */
static int first_time(Ctx *ctx, unsigned what) {
  if (ctx->once & what) return 0;
  ctx->once |= what;
  return 1;
}

/* ---------------- small helpers ---------------- */

static int64_t coarse_ns(void) {
  struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
  clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long env_long(const char *name, long fallback, long lo, long hi) {
  const char *text = getenv(name);
  if (text == NULL || *text == '\0') return fallback;
  char *end;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno != 0 || *end != '\0' || value < lo || value > hi) return fallback;
  return value;
}

static char *trim(char *s) {
  while (*s == ' ' || *s == '\t' || *s == '\r') s++;
  char *end = s + strlen(s);
  while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) *--end = '\0';
  return s;
}

/* A whole-field decimal integer in [lo, hi]; 0 on success. Hand-rolled: strtoll's
 * locale handling was a third of the time communicator init spent parsing rules. */
static int parse_int(const char *text, long long lo, long long hi, long long *out) {
  int negative = *text == '-';
  const char *p = text + negative;
  if (*p < '0' || *p > '9') return -1;
  unsigned long long value = 0;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (value > ((unsigned long long)LLONG_MAX - 9) / 10) return -1;
    value = value * 10 + (unsigned)(*p - '0');
  }
  if (*p != '\0') return -1;
  long long signed_value = negative ? -(long long)value : (long long)value;
  if (signed_value < lo || signed_value > hi) return -1;
  *out = signed_value;
  return 0;
}

static int size_class(size_t nbytes) {
  return nbytes == 0 ? 0 : 63 - __builtin_clzll((unsigned long long)nbytes);
}

/* ---------------- sections ---------------- */

static void section_free(Section *s) {
  for (int c = 0; c < NUM_COLLS; c++) free(s->rules[c]);
  memset(s, 0, sizeof(*s));
}

static int section_add(Section *s, int coll, const Rule *rule) {
  if (s->nrules[coll] == s->cap[coll]) {
    int cap = s->cap[coll] ? 2 * s->cap[coll] : 8;
    Rule *grown = realloc(s->rules[coll], (size_t)cap * sizeof(Rule));
    if (grown == NULL) return -1;
    s->rules[coll] = grown;
    s->cap[coll] = cap;
  }
  s->rules[coll][s->nrules[coll]++] = *rule;
  return 0;
}

/* LINE_OTHER_COMM: a rule for communicators of other sizes; LINE_UNKNOWN: names a collective,
 * algorithm or protocol this plugin does not know (never applies); LINE_BAD: not a rule. */
typedef enum { LINE_OK, LINE_OTHER_COMM, LINE_UNKNOWN, LINE_BAD } LineResult;

static const char *any_or(long long value, char *buf, size_t size) {
  if (value == -1) return "any";
  snprintf(buf, size, "%lld", value);
  return buf;
}

#define WHY_SIZE 160

/* One rule line (comment already stripped); `why` (WHY_SIZE) says what is wrong unless LINE_OK. */
static LineResult parse_rule(Ctx *ctx, char *line, int line_no, int *coll, Rule *rule, char *why) {
  char *fields[10];
  int n = 0;
  for (char *field = line; field != NULL; n++) {
    if (n == 10) {
      snprintf(why, WHY_SIZE, "more than 10 fields");
      return LINE_BAD;
    }
    char *comma = strchr(field, ',');
    if (comma) *comma = '\0';
    fields[n] = trim(field);
    field = comma ? comma + 1 : NULL;
  }
  const char *bad = NULL;
  long long v[10];
  for (int i = 5; i < 10; i++) v[i] = -1;
  if (n < 8)
    bad = "fewer than 8 fields";
  else if (parse_int(fields[1], 0, LLONG_MAX, &v[1]))
    bad = "min_bytes is not a byte count";
  else if (parse_int(fields[2], 0, LLONG_MAX, &v[2]))
    bad = "max_bytes is not a byte count";
  else if (v[1] > v[2])
    bad = "min_bytes is above max_bytes";
  else if (parse_int(fields[5], -1, MAX_CHANNELS, &v[5]) || v[5] == 0)
    bad = "channels must be -1 (NCCL decides) or 1 to 255";
  else if (parse_int(fields[6], -1, INT_MAX, &v[6]) || v[6] == 0)
    bad = "nNodes must be -1 (any) or at least 1";
  else if (parse_int(fields[7], -1, INT_MAX, &v[7]) || v[7] == 0)
    bad = "nRanks must be -1 (any) or at least 1";
  else if (n >= 9 && (parse_int(fields[8], -1, INT_MAX, &v[8]) || v[8] == 0))
    bad = "numPipeOps must be -1 (any) or at least 1";
  else if (n == 10 && parse_int(fields[9], -1, 1, &v[9]))
    bad = "regBuff must be -1 (any), 0 (not registered) or 1 (registered)";
  if (bad != NULL) {
    snprintf(why, WHY_SIZE, "%s", bad);
    return LINE_BAD;
  }
  rule->min_bytes = (size_t)v[1];
  rule->max_bytes = (size_t)v[2];
  rule->channels = (int)v[5];
  rule->pipe_ops = (int)v[8];
  rule->reg_buff = (int)v[9];
  rule->algo = name_index(ALGO_NAMES, NUM_ALGO_NAMES, fields[3]);
  rule->proto = name_index(PROTO_NAMES, NUM_PROTO_NAMES, fields[4]);
  *coll = name_index(COLL_NAMES, NUM_COLLS, fields[0]);
  if (*coll < 0 || rule->algo < 0 || rule->proto < 0) {
    snprintf(why, WHY_SIZE, "unknown %s '%.40s'",
             *coll < 0 ? "collective" : rule->algo < 0 ? "algorithm" : "protocol",
             *coll < 0 ? fields[0] : rule->algo < 0 ? fields[3] : fields[4]);
    if (first_time(ctx, ONCE_UNKNOWN_NAME))
      say(ctx, NCCL_LOG_INFO, __LINE__, "%s line %d: %s: the line never applies", ctx->path,
          line_no, why);
    return LINE_UNKNOWN;
  }
  if (ctx->log_rules) {
    char b[5][24];
    say(ctx, NCCL_LOG_INFO, __LINE__,
        "%s line %d rule: %s bytes %zu..%zu %s/%s channels=%s nNodes=%s nRanks=%s numPipeOps=%s "
        "regBuff=%s", ctx->path, line_no, COLL_NAMES[*coll], rule->min_bytes, rule->max_bytes,
        ALGO_NAMES[rule->algo], PROTO_NAMES[rule->proto], any_or(v[5], b[0], sizeof(b[0])),
        any_or(v[6], b[1], sizeof(b[1])), any_or(v[7], b[2], sizeof(b[2])),
        any_or(v[8], b[3], sizeof(b[3])), any_or(v[9], b[4], sizeof(b[4])));
  }
  if ((v[6] != -1 && (size_t)v[6] != ctx->nnodes) || (v[7] != -1 && (size_t)v[7] != ctx->nranks))
    return LINE_OTHER_COMM;
  return LINE_OK;
}

/* "# dynamiccl: version=V from_call=K"; 0 on success. */
static int parse_header(char *text, int64_t *version, int64_t *from_call) {
  int have_version = 0, have_from = 0;
  for (char *save = NULL, *tok = strtok_r(text, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
    long long value;
    if (strncmp(tok, "version=", 8) == 0) {
      if (parse_int(tok + 8, 0, INT32_MAX - 1, &value)) return -1;
      *version = value;
      have_version = 1;
    } else if (strncmp(tok, "from_call=", 10) == 0) {
      if (parse_int(tok + 10, 0, LLONG_MAX, &value)) return -1;
      *from_call = value;
      have_from = 1;
    } /* other keys are for other readers */
  }
  return have_version && have_from ? 0 : -1;
}

/* Header text after '#', or NULL for an ordinary comment. */
static char *header_text(char *line) {
  char *s = line + 1;
  while (*s == ' ' || *s == '\t') s++;
  return strncmp(s, HEADER_TAG, strlen(HEADER_TAG)) == 0 ? s + strlen(HEADER_TAG) : NULL;
}

static int push_section(Ctx *ctx, Section *s) {
  if (ctx->nsections == ctx->cap_sections) {
    int cap = ctx->cap_sections ? 2 * ctx->cap_sections : 4;
    Section *grown = realloc(ctx->sections, (size_t)cap * sizeof(Section));
    if (grown == NULL) return -1;
    ctx->sections = grown;
    ctx->cap_sections = cap;
  }
  ctx->sections[ctx->nsections++] = *s;
  return 0;
}

/* Closes the section being parsed: appended when it parsed, freed otherwise. */
static int close_section(Ctx *ctx, Section *cur, int parsing, uint64_t *lowest_from) {
  int added = 0;
  if (parsing && push_section(ctx, cur) == 0) {
    ctx->max_version = cur->version;
    if ((uint64_t)cur->from_call < *lowest_from) *lowest_from = (uint64_t)cur->from_call;
    added = 1;
  } else {
    section_free(cur);
  }
  memset(cur, 0, sizeof(*cur));
  return added;
}

/* Parses the sections of `text` newer than any this communicator knows and appends them.
 * Returns how many were added; *lowest_from gets the lowest from_call among them. */
static int merge_file(Ctx *ctx, char *text, uint64_t *lowest_from) {
  enum { NONE_YET, PARSING, SKIPPING } state = NONE_YET; /* SKIPPING: a known or bad section */
  Section cur;
  int64_t last_version = -1;
  int added = 0, line_no = 0;
  memset(&cur, 0, sizeof(cur));
  *lowest_from = UINT64_MAX;
  for (char *next = text; next != NULL;) {
    char *line = next, *newline = strchr(next, '\n');
    if (newline) *newline = '\0';
    next = newline ? newline + 1 : NULL;
    line_no++;
    line = trim(line);
    if (line[0] == '#') {
      char *header = header_text(line);
      if (header == NULL) continue; /* a comment */
      added += close_section(ctx, &cur, state == PARSING, lowest_from);
      int64_t version = 0, from_call = 0;
      if (parse_header(header, &version, &from_call) != 0 || version <= last_version) {
        if (ctx->log_rules)
          say(ctx, NCCL_LOG_INFO, __LINE__,
              "%s line %d refused: a section header needs version=V from_call=K with versions "
              "increasing (its rules are skipped)", ctx->path, line_no);
        if (first_time(ctx, ONCE_BAD_HEADER))
          say(ctx, NCCL_LOG_WARN, __LINE__,
              "%s line %d: a section header needs version=V from_call=K with versions "
              "increasing: section skipped", ctx->path, line_no);
        state = SKIPPING;
        continue;
      }
      last_version = version;
      state = version > ctx->max_version ? PARSING : SKIPPING;
      cur.version = version;
      cur.from_call = from_call;
      continue;
    }
    char *hash = strchr(line, '#');
    if (hash) *hash = '\0';
    line = trim(line);
    if (*line == '\0') continue;
    if (state == NONE_YET) { /* rules before any header: section version 0 from call 0 */
      last_version = 0;
      state = ctx->max_version < 0 ? PARSING : SKIPPING;
    }
    if (state != PARSING) continue;
    int coll;
    Rule rule;
    char why[WHY_SIZE];
    LineResult result = parse_rule(ctx, line, line_no, &coll, &rule, why);
    if (ctx->log_rules && (result == LINE_BAD || result == LINE_UNKNOWN))
      say(ctx, NCCL_LOG_INFO, __LINE__, "%s line %d refused: %s", ctx->path, line_no, why);
    if (result == LINE_BAD) {
      cur.broken = 1;
      if (first_time(ctx, ONCE_BAD_LINE))
        say(ctx, NCCL_LOG_WARN, __LINE__,
            "%s line %d is not a rule (%s; collective,min_bytes,max_bytes,algorithm,protocol,"
            "channels,nNodes,nRanks[,numPipeOps[,regBuff]]): NCCL decides every call while "
            "rules version %lld is in force", ctx->path, line_no, why, (long long)cur.version);
    } else if (result == LINE_OK && section_add(&cur, coll, &rule) != 0) {
      cur.broken = 1; /* out of memory: never a partial rule set */
    }
  }
  return added + close_section(ctx, &cur, state == PARSING, lowest_from);
}

/* Reads the file if it exists; returns the number of new sections. */
static int load_file(Ctx *ctx, uint64_t call) {
  int fd = open(ctx->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (first_time(ctx, ONCE_NO_FILE))
      say(ctx, NCCL_LOG_WARN, __LINE__, "cannot read %s (%s): %s", ctx->path, strerror(errno),
          ctx->nsections ? "the rules learned so far stay in force" : "NCCL decides");
    return 0;
  }
  struct stat st;
  char *text = NULL;
  int added = 0;
  if (fstat(fd, &st) != 0) goto done;
  ctx->have_stat = 1;
  ctx->dev = st.st_dev;
  ctx->ino = st.st_ino;
  ctx->size = st.st_size;
  ctx->mtime = st.st_mtim;
  if (st.st_size > MAX_FILE_BYTES) {
    if (first_time(ctx, ONCE_BAD_FILE))
      say(ctx, NCCL_LOG_WARN, __LINE__, "%s is over %d bytes: ignored", ctx->path, MAX_FILE_BYTES);
    goto done;
  }
  text = malloc((size_t)st.st_size + 1);
  if (text == NULL) goto done;
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t n = read(fd, text + got, (size_t)st.st_size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  text[got] = '\0';
  if (memchr(text, '\0', got) != NULL) {
    if (first_time(ctx, ONCE_BAD_FILE))
      say(ctx, NCCL_LOG_WARN, __LINE__, "%s is not a text file: ignored", ctx->path);
    goto done;
  }
  uint64_t lowest_from;
  added = merge_file(ctx, text, &lowest_from);
  if (added && lowest_from < call) {
    ctx->late += (uint64_t)added;
    say(ctx, NCCL_LOG_WARN, __LINE__,
        "%s: rules from call %llu seen only at call %llu of communicator %llu: its other ranks "
        "may have switched earlier; switching now (announce switches further ahead)",
        ctx->path, (unsigned long long)lowest_from, (unsigned long long)call,
        (unsigned long long)ctx->serial);
  }
done:
  free(text);
  close(fd);
  return added;
}

/* Brings the section in force up to call index `call` and drops sections it supersedes. */
static void advance(Ctx *ctx, uint64_t call) {
  int best = -1;
  for (int i = 0; i < ctx->nsections; i++)
    if ((uint64_t)ctx->sections[i].from_call <= call) best = i;
  if (best >= 0 && !(ctx->active && best == 0)) {
    for (int i = 0; i < best; i++) section_free(&ctx->sections[i]);
    memmove(ctx->sections, ctx->sections + best, (size_t)(ctx->nsections - best) * sizeof(Section));
    ctx->nsections -= best;
    ctx->active = 1;
    STORE(ctx->active_version, ctx->sections[0].version);
    say(ctx, NCCL_LOG_INFO, __LINE__, "rules version %lld in force from call %llu (%s)",
        (long long)ctx->sections[0].version, (unsigned long long)call,
        ctx->sections[0].broken ? "malformed: NCCL decides" : ctx->path);
  }
  ctx->next_switch = UINT64_MAX;
  for (int i = ctx->active; i < ctx->nsections; i++)
    if ((uint64_t)ctx->sections[i].from_call < ctx->next_switch)
      ctx->next_switch = (uint64_t)ctx->sections[i].from_call;
}

static int file_changed(Ctx *ctx) {
  struct stat st;
  if (stat(ctx->path, &st) != 0) return 0; /* gone: what was learned stays in force */
  return !ctx->have_stat || st.st_ino != ctx->ino || st.st_dev != ctx->dev ||
         st.st_size != ctx->size || st.st_mtim.tv_sec != ctx->mtime.tv_sec ||
         st.st_mtim.tv_nsec != ctx->mtime.tv_nsec;
}

/* ---------------- the report ---------------- */

/* bits 0-3 source, 4-11 algorithm+1, 12-19 protocol+1, 20-31 channels (0: NCCL's),
 * 32-63 version+1 (0: no rules in force) */
static uint64_t pack_choice(int source, int algo, int proto, int channels, int64_t version) {
  return (uint64_t)(version + 1) << 32 | (uint64_t)(channels > 0 ? channels : 0) << 20 |
         (uint64_t)((proto + 1) & 0xFF) << 12 | (uint64_t)((algo + 1) & 0xFF) << 4 |
         (uint64_t)source;
}

static void write_choice(FILE *out, int coll, int cls, uint64_t choice, uint64_t calls, int first) {
  int source = (int)(choice & 0xF), algo = (int)((choice >> 4) & 0xFF) - 1;
  int proto = (int)((choice >> 12) & 0xFF) - 1, channels = (int)((choice >> 20) & 0xFFF);
  long long version = (long long)(choice >> 32) - 1;
  fprintf(out, "%s\n    {\"collective\": \"%s\", \"size_log2\": %d, \"source\": \"%s\", ",
          first ? "" : ",", COLL_NAMES[coll], cls, source == SOURCE_RULE ? "rule" : "nccl");
  if (algo >= 0 && algo < NUM_ALGO_NAMES && proto >= 0 && proto < NUM_PROTO_NAMES)
    fprintf(out, "\"algo\": \"%s\", \"proto\": \"%s\", ", ALGO_NAMES[algo], PROTO_NAMES[proto]);
  else
    fprintf(out, "\"algo\": null, \"proto\": null, ");
  if (channels > 0) fprintf(out, "\"channels\": %d, ", channels);
  else fprintf(out, "\"channels\": null, ");
  if (version >= 0) fprintf(out, "\"version\": %lld, ", version);
  else fprintf(out, "\"version\": null, ");
  fprintf(out, "\"calls\": %llu}", (unsigned long long)calls);
}

static void write_comm(FILE *out, Ctx *c, int finalized, int first) {
  int64_t version = LOAD(c->active_version);
  fprintf(out, "%s\n  {\"ctx\": %llu, ", first ? "" : ",", (unsigned long long)c->serial);
  if (c->has_comm_id) fprintf(out, "\"comm_id\": \"0x%016llx\", ", (unsigned long long)c->comm_id);
  else fprintf(out, "\"comm_id\": null, ");
  fprintf(out, "\"nranks\": %zu, \"nnodes\": %zu, \"calls\": %llu, ", c->nranks, c->nnodes,
          (unsigned long long)LOAD(c->calls));
  if (version >= 0) fprintf(out, "\"version\": %lld, ", (long long)version);
  else fprintf(out, "\"version\": null, ");
  fprintf(out, "\"late\": %llu, \"finalized\": %s, \"choices\": [", (unsigned long long)LOAD(c->late),
          finalized ? "true" : "false");
  int first_choice = 1;
  for (int coll = 0; coll < NUM_COLLS; coll++)
    for (int cls = 0; cls < NUM_SIZE_CLASSES; cls++) {
      uint64_t choice = LOAD(c->cells[coll][cls].choice);
      if (choice == 0) continue;
      write_choice(out, coll, cls, choice, LOAD(c->cells[coll][cls].calls), first_choice);
      first_choice = 0;
    }
  fprintf(out, "]}");
}

/* Rewrites the process's report (caller holds g_lock). `ctx` is the caller's context, for
 * the path and the logger; `finalized` is marked as such. */
static void write_report(Ctx *ctx, const Ctx *finalized) {
  char path[PATH_MAX + 64], tmp[PATH_MAX + 80];
  int pid = (int)getpid();
  if (snprintf(path, sizeof(path), "%s.chosen.%d.json", ctx->path, pid) >= (int)sizeof(path)) return;
  snprintf(tmp, sizeof(tmp), "%s.tmp", path);
  /* Never through a planted file or link: a new file, or nothing (rename replaces a link at `path`
   * itself, not what it points to). A leftover of a crashed process is removed (unlink removes a
   * link, never its target) and the creation tried once more. */
  int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  int fd = open(tmp, flags, 0644);
  if (fd < 0 && errno == EEXIST && unlink(tmp) == 0) fd = open(tmp, flags, 0644);
  if (fd < 0) goto fail_open;
  FILE *out = fdopen(fd, "w");
  if (out == NULL) {
    close(fd);
    goto fail;
  }
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  fprintf(out, "{\"pid\": %d, \"time_unix_ms\": %lld, \"comms\": [", pid,
          (long long)now.tv_sec * 1000LL + now.tv_nsec / 1000000);
  int first = 1;
  for (Ctx *c = g_contexts; c != NULL; c = c->next) {
    if (strcmp(c->path, ctx->path) != 0) continue;
    write_comm(out, c, c == finalized, first);
    first = 0;
  }
  fprintf(out, "]}\n");
  if (fclose(out) != 0 || rename(tmp, path) != 0) goto fail;
  return;
fail:
  unlink(tmp);
fail_open:
  if (first_time(ctx, ONCE_REPORT))
    say(ctx, NCCL_LOG_WARN, __LINE__, "cannot write %s (%s): no report of the choices made", path,
        strerror(errno));
}

/* Called on NCCL's path: never waits for the lock. */
static void maybe_report(Ctx *ctx, int64_t now) {
  if (now - LOAD(g_last_report_ns) < ctx->report_ns) return;
  if (pthread_mutex_trylock(&g_lock) != 0) return;
  if (now - g_last_report_ns >= ctx->report_ns) {
    write_report(ctx, NULL);
    STORE(g_last_report_ns, now);
  }
  pthread_mutex_unlock(&g_lock);
}

/* ---------------- the plugin ---------------- */

/* The periodic check, before call `call` is decided; returns the time it read. */
static int64_t check_file(Ctx *ctx, uint64_t call) {
  ctx->countdown = ctx->check_every;
  int64_t now = coarse_ns();
  if (ctx->reload_ns >= 0 && now - ctx->last_check_ns >= ctx->reload_ns) {
    ctx->last_check_ns = now;
    if (file_changed(ctx) && load_file(ctx, call) > 0) ctx->next_switch = 0; /* re-evaluate */
  }
  return now;
}

static ncclResult_t start(void **context, int has_comm_id, uint64_t comm_id, size_t nRanks,
                          size_t nNodes, ncclDebugLogger_t log) {
  if (context == NULL) return ncclInvalidArgument;
  Ctx *ctx = calloc(1, sizeof(Ctx));
  if (ctx == NULL) return ncclSystemError;
  ctx->has_comm_id = has_comm_id;
  ctx->comm_id = comm_id;
  ctx->nranks = nRanks;
  ctx->nnodes = nNodes;
  ctx->log = log;
  ctx->max_version = -1;
  ctx->active_version = -1;
  ctx->next_switch = UINT64_MAX;
  ctx->reload_ns = ctx->report_ns = -1;
  const char *path = getenv("NCCL_TUNER_CONFIG_FILE");
  if (path != NULL && *path != '\0' && strlen(path) < sizeof(ctx->path)) {
    strcpy(ctx->path, path);
    ctx->check_every = (int)env_long("DYNAMICCL_TUNER_CHECK_CALLS", 64, 1, 1 << 30);
    ctx->reload_ns = env_long("DYNAMICCL_TUNER_RELOAD_MS", 200, -1, 86400000L) * 1000000LL;
    ctx->report_ns = env_long("DYNAMICCL_TUNER_REPORT_MS", 1000, -1, 86400000L) * 1000000LL;
    ctx->log_rules = (int)env_long("DYNAMICCL_TUNER_LOG_RULES", 0, 0, 1);
    if (ctx->reload_ns < 0 && ctx->report_ns < 0) ctx->check_every = 0;
    ctx->countdown = ctx->check_every;
    ctx->last_check_ns = coarse_ns();
    load_file(ctx, 0);
    advance(ctx, 0);
  } else {
    first_time(ctx, ONCE_NO_FILE);
    say(ctx, NCCL_LOG_INFO, __LINE__, "NCCL_TUNER_CONFIG_FILE is not set: NCCL decides every call");
  }
  pthread_mutex_lock(&g_lock);
  ctx->serial = ++g_serial;
  ctx->next = g_contexts;
  g_contexts = ctx;
  pthread_mutex_unlock(&g_lock);
  say(ctx, NCCL_LOG_INFO, __LINE__,
      "communicator %llu (%zu ranks, %zu nodes): %d rule sections known, version %lld in force",
      (unsigned long long)ctx->serial, nRanks, nNodes, ctx->nsections,
      (long long)ctx->active_version);
  *context = ctx;
  return ncclSuccess;
}

/* The index in the cost table NCCL's own model would pick (cheapest available), or -1. */
static int cheapest(const float *table, int cells) {
  int best = -1;
  for (int i = 0; i < cells; i++)
    if (table[i] >= 0.0f && (best < 0 || table[i] < table[best])) best = i;
  return best;
}

static void record(Ctx *ctx, int coll, size_t nBytes, uint64_t choice) {
  Cell *cell = &ctx->cells[coll][size_class(nBytes)];
  if (LOAD(cell->choice) == choice) {
    STORE(cell->calls, LOAD(cell->calls) + 1);
  } else {
    STORE(cell->choice, choice);
    STORE(cell->calls, 1);
  }
}

/* Applies the first matching rule in force whose pair NCCL offers, or leaves NCCL's choice;
 * records what ran. */
static void decide(Ctx *ctx, int coll, size_t nBytes, int numPipeOps, float **collCostTable,
                   int numAlgo, int numProto, int regBuff, int *nChannels) {
  if (coll < 0 || coll >= NUM_COLLS || collCostTable == NULL || numAlgo <= 0 || numProto <= 0)
    return;
  float *table = (float *)collCostTable; /* float[numAlgo][numProto], contiguous */
  const Section *s = ctx->active ? &ctx->sections[0] : NULL;
  int64_t version = s ? s->version : -1;
  if (s != NULL && !s->broken) {
    const Rule *rule = s->rules[coll];
    for (int i = 0, n = s->nrules[coll]; i < n; i++, rule++) {
      if (nBytes < rule->min_bytes || nBytes > rule->max_bytes ||
          (rule->pipe_ops != -1 && rule->pipe_ops != numPipeOps) ||
          (rule->reg_buff != -1 && rule->reg_buff != regBuff))
        continue;
      float *cost = rule->algo < numAlgo && rule->proto < numProto
                        ? &table[rule->algo * numProto + rule->proto]
                        : NULL;
      if (cost != NULL && *cost >= 0.0f) {
        *cost = 0.0f;
        if (rule->channels > 0 && nChannels != NULL) *nChannels = rule->channels;
        record(ctx, coll, nBytes,
               pack_choice(SOURCE_RULE, rule->algo, rule->proto, rule->channels, version));
        return;
      }
      if (first_time(ctx, ONCE_UNAVAILABLE))
        say(ctx, NCCL_LOG_INFO, __LINE__,
            "%s of %zu bytes: the rule's %s/%s is not available to NCCL here: the next matching "
            "rule applies, or NCCL decides", COLL_NAMES[coll], nBytes, ALGO_NAMES[rule->algo],
            PROTO_NAMES[rule->proto]);
    }
  }
  int pick = cheapest(table, numAlgo * numProto);
  record(ctx, coll, nBytes,
         pack_choice(SOURCE_NCCL, pick < 0 ? -1 : pick / numProto, pick < 0 ? -1 : pick % numProto,
                     -1, version));
}

static ncclResult_t collinfo(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                             float **collCostTable, int numAlgo, int numProto, int regBuff,
                             int *nChannels) {
  Ctx *ctx = context;
  if (ctx == NULL) return ncclSuccess; /* NCCL decides */
  uint64_t call = ctx->calls;
  STORE(ctx->calls, call + 1);
  int check = ctx->check_every && --ctx->countdown <= 0;
  int64_t now = check ? check_file(ctx, call) : 0;
  if (call >= ctx->next_switch) advance(ctx, call);
  decide(ctx, (int)collType, nBytes, numPipeOps, collCostTable, numAlgo, numProto, regBuff,
         nChannels);
  if (check && ctx->report_ns >= 0) maybe_report(ctx, now);
  return ncclSuccess;
}

static ncclResult_t finish(void *context) {
  Ctx *ctx = context;
  if (ctx == NULL) return ncclSuccess;
  pthread_mutex_lock(&g_lock);
  if (ctx->report_ns >= 0 && ctx->calls > 0) write_report(ctx, ctx); /* its last choices */
  for (Ctx **p = &g_contexts; *p != NULL; p = &(*p)->next)
    if (*p == ctx) {
      *p = ctx->next;
      break;
    }
  pthread_mutex_unlock(&g_lock);
  for (int i = 0; i < ctx->nsections; i++) section_free(&ctx->sections[i]);
  free(ctx->sections);
  free(ctx);
  return ncclSuccess;
}

/* ---------------- the versions NCCL looks for ---------------- */

static ncclResult_t init_v5(void **context, uint64_t commId, size_t nRanks, size_t nNodes,
                            ncclDebugLogger_t logFunction, ncclNvlDomainInfo_v5_t *nvlDomainInfo,
                            ncclTunerConstants_v5_t *constants) {
  (void)nvlDomainInfo;
  (void)constants;
  return start(context, 1, commId, nRanks, nNodes, logFunction);
}

static ncclResult_t init_v7(void **context, uint64_t commId, size_t nRanks, size_t nNodes,
                            ncclDebugLogger_t logFunction, ncclNvlDomainInfo_v5_t *nvlDomainInfo,
                            ncclTunerConstants_v7_t *constants) {
  (void)nvlDomainInfo;
  (void)constants;
  return start(context, 1, commId, nRanks, nNodes, logFunction);
}

static ncclResult_t init_v3(size_t nRanks, size_t nNodes, ncclDebugLogger_t logFunction,
                            void **context) {
  return start(context, 0, 0, nRanks, nNodes, logFunction);
}

/* v3 has no regBuff: its calls count as unregistered buffers. */
static ncclResult_t collinfo_v3(void *context, ncclFunc_t collType, size_t nBytes, int numPipeOps,
                                float **collCostTable, int numAlgo, int numProto, int *nChannels) {
  return collinfo(context, collType, nBytes, numPipeOps, collCostTable, numAlgo, numProto, 0,
                  nChannels);
}

#define PLUGIN_NAME "DynamICCL"

EXPORT const ncclTuner_v7_t ncclTunerPlugin_v7 = {.name = PLUGIN_NAME, .init = init_v7,
                                                   .getCollInfo = collinfo, .finalize = finish,
                                                   .getChunkSize = NULL};
EXPORT const ncclTuner_v6_t ncclTunerPlugin_v6 = {.name = PLUGIN_NAME, .init = init_v5,
                                                   .getCollInfo = collinfo, .finalize = finish,
                                                   .getChunkSize = NULL};
EXPORT const ncclTuner_v5_t ncclTunerPlugin_v5 = {.name = PLUGIN_NAME, .init = init_v5,
                                                   .getCollInfo = collinfo, .finalize = finish};
EXPORT const ncclTuner_v4_t ncclTunerPlugin_v4 = {.name = PLUGIN_NAME, .init = init_v3,
                                                   .getCollInfo = collinfo, .destroy = finish};
EXPORT const ncclTuner_v3_t ncclTunerPlugin_v3 = {.name = PLUGIN_NAME, .init = init_v3,
                                                   .getCollInfo = collinfo_v3, .destroy = finish};
