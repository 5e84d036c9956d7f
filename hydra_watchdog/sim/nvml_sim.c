/*
 * A simulated libnvidia-ml.so.1, loaded by the real nvidia-ml-py binding (pynvml).
 *
 * Build: gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 nvml_sim.c
 * (hydra_watchdog/sim/nvml_build.py does this and caches the result by source hash).
 *
 * Theory of operation
 * -------------------
 * The GPU state lives in a text file named by $HYDRA_NVML_SIM_STATE, and every call reads it
 * again: a test (or hydra_watchdog/sim/nvml_state.py) edits the file while a daemon runs and the
 * next NVML call sees the change, exactly like a driver whose state moves under its clients.
 * No file (or no variable) reads as "no driver": nvmlInit fails with DRIVER_NOT_LOADED.
 *
 * File format, one directive per line, '#' starts a comment:
 *   driver_loaded 0|1
 *   driver_version 570.133.07
 *   device <index> key=value ...      (values are %XX-escaped: "NVIDIA%20GeForce%20RTX%205090")
 *       keys: uuid name mem_total mem_reserved mem_base power_usage_mw power_limit_mw
 *             power_enforced_mw (0: follows the limit) power_min_mw power_max_mw
 *             power_default_mw temp util_gpu util_mem reasons set_permission
 *   proc <gpu> <pid> <bytes>           (counted only while <pid> lives and is not a zombie:
 *                                       the driver frees a process's memory when it exits)
 *   fail <symbol|*> <nvml code> [gpu]  (the call returns that code; '*' = every call but
 *                                       nvmlShutdown and nvmlErrorString)
 *   hang <symbol|*> <seconds> [gpu]    (the call sleeps first; negative seconds: until the
 *                                       line is gone from the file, or the file is gone)
 *
 * nvmlDeviceSetPowerManagementLimit writes the new limit back into the file. Writers (this
 * library and the Python side) take an exclusive flock on "<file>.lock" and replace the file by
 * rename, so readers never see half a file and a read-modify-write never loses another writer's
 * change. The lock lives on a separate file because rename swaps the state file's inode.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define STATE_ENV "HYDRA_NVML_SIM_STATE"
#define MAX_DEVICES 16
#define MAX_PROCS 256
#define MAX_RULES 64
#define MEMORY_V2_VERSION 0x02000028u /* sizeof(nvmlMemory_v2_t) | 2 << 24 */
#define NO_GPU (-1)

struct sim_device {
    int present;
    char uuid[96];
    char name[96];
    unsigned long long mem_total, mem_reserved, mem_base;
    unsigned power_usage_mw, power_limit_mw, power_enforced_mw;
    unsigned power_min_mw, power_max_mw, power_default_mw;
    unsigned temp, util_gpu, util_mem;
    unsigned long long reasons;
    int set_permission;
};

struct sim_proc {
    int gpu;
    unsigned pid;
    unsigned long long bytes;
};

struct sim_rule {
    char symbol[80];
    int gpu; /* NO_GPU: any call */
    int code;
    double seconds;
};

struct sim_state {
    int driver_loaded;
    char driver_version[80];
    unsigned device_count; /* highest index + 1 */
    struct sim_device dev[MAX_DEVICES];
    unsigned nproc;
    struct sim_proc proc[MAX_PROCS];
    unsigned nfail;
    struct sim_rule fail[MAX_RULES];
    unsigned nhang;
    struct sim_rule hang[MAX_RULES];
};

/* A handle is a pointer into this table: stable across re-reads of the file. */
struct nvmlDevice_st {
    unsigned index;
};
typedef struct nvmlDevice_st *nvmlDevice_t;
static struct nvmlDevice_st g_handles[MAX_DEVICES] = {
    {0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15},
};

static int g_refcount; /* nvmlInit nesting, as real NVML counts it */

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId;
    unsigned computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned gpu, memory;
} nvmlUtilization_t;

/* ---- parsing -------------------------------------------------------------------------- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void unescape(const char *src, char *dst, size_t size)
{
    size_t n = 0;
    while (*src && n + 1 < size) {
        if (src[0] == '%' && hexval(src[1]) >= 0 && hexval(src[2]) >= 0) {
            dst[n++] = (char)(hexval(src[1]) * 16 + hexval(src[2]));
            src += 3;
        } else {
            dst[n++] = *src++;
        }
    }
    dst[n] = '\0';
}

static unsigned long long num(const char *s)
{
    return strtoull(s, NULL, 0); /* 0 base: "0x44" for reason bits works too */
}

static void parse_device_kv(struct sim_device *d, const char *key, const char *val)
{
    if (!strcmp(key, "uuid")) unescape(val, d->uuid, sizeof d->uuid);
    else if (!strcmp(key, "name")) unescape(val, d->name, sizeof d->name);
    else if (!strcmp(key, "mem_total")) d->mem_total = num(val);
    else if (!strcmp(key, "mem_reserved")) d->mem_reserved = num(val);
    else if (!strcmp(key, "mem_base")) d->mem_base = num(val);
    else if (!strcmp(key, "power_usage_mw")) d->power_usage_mw = (unsigned)num(val);
    else if (!strcmp(key, "power_limit_mw")) d->power_limit_mw = (unsigned)num(val);
    else if (!strcmp(key, "power_enforced_mw")) d->power_enforced_mw = (unsigned)num(val);
    else if (!strcmp(key, "power_min_mw")) d->power_min_mw = (unsigned)num(val);
    else if (!strcmp(key, "power_max_mw")) d->power_max_mw = (unsigned)num(val);
    else if (!strcmp(key, "power_default_mw")) d->power_default_mw = (unsigned)num(val);
    else if (!strcmp(key, "temp")) d->temp = (unsigned)num(val);
    else if (!strcmp(key, "util_gpu")) d->util_gpu = (unsigned)num(val);
    else if (!strcmp(key, "util_mem")) d->util_mem = (unsigned)num(val);
    else if (!strcmp(key, "reasons")) d->reasons = num(val);
    else if (!strcmp(key, "set_permission")) d->set_permission = (int)num(val);
    /* unknown keys are ignored: a newer writer must not break an older library */
}

static void parse_rule(struct sim_rule *r, char **save, int is_hang)
{
    char *sym = strtok_r(NULL, " \t\r\n", save);
    char *val = strtok_r(NULL, " \t\r\n", save);
    char *gpu = strtok_r(NULL, " \t\r\n", save);
    snprintf(r->symbol, sizeof r->symbol, "%s", sym ? sym : "");
    r->code = (!is_hang && val) ? (int)strtol(val, NULL, 0) : NVML_ERROR_UNKNOWN;
    r->seconds = (is_hang && val) ? strtod(val, NULL) : 0.0;
    r->gpu = gpu ? (int)strtol(gpu, NULL, 0) : NO_GPU;
}

static void parse_line(struct sim_state *st, char *line)
{
    char *save = NULL;
    char *hash = strchr(line, '#');
    if (hash) *hash = '\0';
    char *word = strtok_r(line, " \t\r\n", &save);
    if (!word) return;
    if (!strcmp(word, "driver_loaded")) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        st->driver_loaded = v ? (int)num(v) : 1;
    } else if (!strcmp(word, "driver_version")) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        if (v) unescape(v, st->driver_version, sizeof st->driver_version);
    } else if (!strcmp(word, "device")) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        if (!v) return;
        unsigned long long idx = num(v);
        if (idx >= MAX_DEVICES) return;
        struct sim_device *d = &st->dev[idx];
        memset(d, 0, sizeof *d);
        d->present = 1;
        d->set_permission = 1;
        if (idx + 1 > st->device_count) st->device_count = (unsigned)idx + 1;
        char *kv;
        while ((kv = strtok_r(NULL, " \t\r\n", &save)) != NULL) {
            char *eq = strchr(kv, '=');
            if (!eq) continue;
            *eq = '\0';
            parse_device_kv(d, kv, eq + 1);
        }
    } else if (!strcmp(word, "proc")) {
        char *g = strtok_r(NULL, " \t\r\n", &save);
        char *p = strtok_r(NULL, " \t\r\n", &save);
        char *b = strtok_r(NULL, " \t\r\n", &save);
        if (!g || !p || !b || st->nproc >= MAX_PROCS) return;
        struct sim_proc *pr = &st->proc[st->nproc++];
        pr->gpu = (int)strtol(g, NULL, 0);
        pr->pid = (unsigned)num(p);
        pr->bytes = num(b);
    } else if (!strcmp(word, "fail")) {
        if (st->nfail < MAX_RULES) parse_rule(&st->fail[st->nfail++], &save, 0);
    } else if (!strcmp(word, "hang")) {
        if (st->nhang < MAX_RULES) parse_rule(&st->hang[st->nhang++], &save, 1);
    }
}

/* 0 on success, -1 when there is no state to read (no variable, no file). */
static int load_state(struct sim_state *st)
{
    const char *path = getenv(STATE_ENV);
    memset(st, 0, sizeof *st);
    st->driver_loaded = 1;
    snprintf(st->driver_version, sizeof st->driver_version, "570.133.07");
    if (!path || !*path) return -1;
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) != -1) parse_line(st, line);
    free(line);
    fclose(f);
    return 0;
}

/* ---- semantics ------------------------------------------------------------------------ */

/* The driver frees a process's memory when it exits, before its parent reaps it: a zombie
 * holds no GPU memory, so it counts as gone. */
static int pid_alive(unsigned pid)
{
    char path[64], buf[512];
    if (pid == 0) return 0;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *paren = strrchr(buf, ')');
    if (!paren || paren[1] != ' ') return 1;
    return paren[2] != 'Z' && paren[2] != 'X';
}

static unsigned long long live_bytes(const struct sim_state *st, int gpu)
{
    unsigned long long sum = 0;
    for (unsigned i = 0; i < st->nproc; i++)
        if (st->proc[i].gpu == gpu && pid_alive(st->proc[i].pid)) sum += st->proc[i].bytes;
    return sum;
}

static int rule_matches(const struct sim_rule *r, const char *symbol, int gpu)
{
    if (r->gpu != NO_GPU && r->gpu != gpu) return 0;
    if (!strcmp(r->symbol, symbol)) return 1;
    return !strcmp(r->symbol, "*") && strcmp(symbol, "nvmlShutdown") != 0;
}

static void sleep_seconds(double s)
{
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* A finite hang sleeps once; an open-ended one (negative seconds) lasts while its line is in
 * the file, so a test can release a stuck call by editing the file. Returns with `st` fresh. */
static void apply_hangs(struct sim_state *st, const char *symbol, int gpu)
{
    for (unsigned i = 0; i < st->nhang; i++) {
        if (!rule_matches(&st->hang[i], symbol, gpu)) continue;
        double s = st->hang[i].seconds;
        if (s > 0) {
            sleep_seconds(s);
            load_state(st);
            return;
        }
        if (s < 0) {
            for (;;) {
                sleep_seconds(0.02);
                if (load_state(st) != 0) return;
                int still = 0;
                for (unsigned j = 0; j < st->nhang; j++)
                    if (rule_matches(&st->hang[j], symbol, gpu) && st->hang[j].seconds < 0) still = 1;
                if (!still) return;
            }
        }
    }
}

static nvmlReturn_t configured_failure(const struct sim_state *st, const char *symbol, int gpu)
{
    for (unsigned i = 0; i < st->nfail; i++)
        if (rule_matches(&st->fail[i], symbol, gpu)) return st->fail[i].code;
    return NVML_SUCCESS;
}

/* The prologue of every call but init/shutdown/errorString: hang, then initialised, driver
 * present, then a configured failure. */
static nvmlReturn_t enter(struct sim_state *st, const char *symbol, int gpu)
{
    if (load_state(st) != 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    apply_hangs(st, symbol, gpu);
    if (__atomic_load_n(&g_refcount, __ATOMIC_SEQ_CST) <= 0) return NVML_ERROR_UNINITIALIZED;
    if (!st->driver_loaded) return NVML_ERROR_DRIVER_NOT_LOADED;
    return configured_failure(st, symbol, gpu);
}

/* Resolve a handle to a present device, then run the prologue for that GPU. */
static nvmlReturn_t enter_device(struct sim_state *st, const char *symbol, nvmlDevice_t device,
                                 struct sim_device **out)
{
    if (device < &g_handles[0] || device > &g_handles[MAX_DEVICES - 1])
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = (int)device->index;
    nvmlReturn_t r = enter(st, symbol, gpu);
    if (r != NVML_SUCCESS) return r;
    if (!st->dev[gpu].present) return NVML_ERROR_GPU_IS_LOST; /* it was there at GetHandle */
    *out = &st->dev[gpu];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *dst, unsigned length, const char *src)
{
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ---- persistence ---------------------------------------------------------------------- */

static int lock_state(const char *path)
{
    char lockpath[4096];
    if (snprintf(lockpath, sizeof lockpath, "%s.lock", path) >= (int)sizeof lockpath) return -1;
    int fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    while (flock(fd, LOCK_EX) == -1) {
        if (errno != EINTR) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

/* Copy the file line by line, rewriting only power_limit_mw on device <gpu>'s line, so that
 * every directive this library does not model (comments, future keys) survives. */
static int rewrite_power_limit(const char *path, int gpu, unsigned mw)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.XXXXXX", path) >= (int)sizeof tmp) return -1;
    int fd = mkstemp(tmp);
    if (fd < 0) return -1;
    fchmod(fd, 0644);
    FILE *out = fdopen(fd, "w");
    FILE *in = fopen(path, "re");
    if (!out || !in) {
        if (out) fclose(out);
        else close(fd);
        if (in) fclose(in);
        unlink(tmp);
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, in)) != -1) {
        char *copy = strdup(line);
        char *save = NULL;
        char *w = copy ? strtok_r(copy, " \t\r\n", &save) : NULL;
        char *idx = (w && !strcmp(w, "device")) ? strtok_r(NULL, " \t\r\n", &save) : NULL;
        if (idx && strtol(idx, NULL, 0) == gpu) {
            fprintf(out, "device %d", gpu);
            int seen = 0;
            char *kv;
            while ((kv = strtok_r(NULL, " \t\r\n", &save)) != NULL) {
                if (!strncmp(kv, "power_limit_mw=", 15)) {
                    fprintf(out, " power_limit_mw=%u", mw);
                    seen = 1;
                } else {
                    fprintf(out, " %s", kv);
                }
            }
            if (!seen) fprintf(out, " power_limit_mw=%u", mw);
            fputc('\n', out);
        } else {
            fwrite(line, 1, (size_t)len, out);
        }
        free(copy);
    }
    free(line);
    fclose(in);
    int bad = fflush(out) != 0 || fsync(fileno(out)) != 0;
    bad |= fclose(out) != 0;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* ---- the API -------------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned flags)
{
    (void)flags;
    struct sim_state st;
    if (load_state(&st) != 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    apply_hangs(&st, "nvmlInitWithFlags", NO_GPU);
    if (!st.driver_loaded) return NVML_ERROR_DRIVER_NOT_LOADED;
    nvmlReturn_t r = configured_failure(&st, "nvmlInitWithFlags", NO_GPU);
    if (r != NVML_SUCCESS) return r;
    __atomic_add_fetch(&g_refcount, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    struct sim_state st;
    if (load_state(&st) == 0) {
        apply_hangs(&st, "nvmlShutdown", NO_GPU);
        nvmlReturn_t r = configured_failure(&st, "nvmlShutdown", NO_GPU);
        if (r != NVML_SUCCESS) return r;
    }
    int left = __atomic_sub_fetch(&g_refcount, 1, __ATOMIC_SEQ_CST);
    if (left < 0) {
        __atomic_add_fetch(&g_refcount, 1, __ATOMIC_SEQ_CST);
        return NVML_ERROR_UNINITIALIZED;
    }
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Simulated NVML error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length)
{
    struct sim_state st;
    nvmlReturn_t r = enter(&st, "nvmlSystemGetDriverVersion", NO_GPU);
    return r != NVML_SUCCESS ? r : copy_string(version, length, st.driver_version);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count)
{
    struct sim_state st;
    nvmlReturn_t r = enter(&st, "nvmlDeviceGetCount_v2", NO_GPU);
    if (r != NVML_SUCCESS) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = st.device_count;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device)
{
    struct sim_state st;
    int gpu = index < MAX_DEVICES ? (int)index : NO_GPU;
    nvmlReturn_t r = enter(&st, "nvmlDeviceGetHandleByIndex_v2", gpu);
    if (r != NVML_SUCCESS) return r;
    if (!device || gpu == NO_GPU || !st.dev[gpu].present) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_handles[gpu];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    struct sim_state st;
    nvmlReturn_t r = enter(&st, "nvmlDeviceGetHandleByUUID", NO_GPU);
    if (r != NVML_SUCCESS) return r;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < MAX_DEVICES; i++) {
        if (!st.dev[i].present || strcmp(st.dev[i].uuid, uuid) != 0) continue;
        r = configured_failure(&st, "nvmlDeviceGetHandleByUUID", i);
        if (r != NVML_SUCCESS) return r;
        *device = &g_handles[i];
        return NVML_SUCCESS;
    }
    return NVML_ERROR_NOT_FOUND;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned *index)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetIndex", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned length)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetName", device, &d);
    return r != NVML_SUCCESS ? r : copy_string(name, length, d->name);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned length)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetUUID", device, &d);
    return r != NVML_SUCCESS ? r : copy_string(uuid, length, d->uuid);
}

/* v1 `used` includes the memory the driver reserves (R510+); v2 reports it apart. */
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetMemoryInfo", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used = d->mem_reserved + d->mem_base + live_bytes(&st, (int)device->index);
    if (used > d->mem_total) used = d->mem_total;
    memory->total = d->mem_total;
    memory->used = used;
    memory->free = d->mem_total - used;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetMemoryInfo_v2", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != MEMORY_V2_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned long long usable = d->mem_total > d->mem_reserved ? d->mem_total - d->mem_reserved : 0;
    unsigned long long used = d->mem_base + live_bytes(&st, (int)device->index);
    if (used > usable) used = usable;
    memory->total = d->mem_total;
    memory->reserved = d->mem_reserved;
    memory->used = used;
    memory->free = usable - used;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned *infoCount,
                                                            nvmlProcessInfo_t *infos)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetComputeRunningProcesses_v3", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!infoCount) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (unsigned i = 0; i < st.nproc; i++)
        if (st.proc[i].gpu == (int)device->index && pid_alive(st.proc[i].pid)) n++;
    if (n == 0) {
        *infoCount = 0;
        return NVML_SUCCESS;
    }
    if (!infos || *infoCount < n) {
        *infoCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (unsigned i = 0; i < st.nproc && k < n; i++) {
        if (st.proc[i].gpu != (int)device->index || !pid_alive(st.proc[i].pid)) continue;
        infos[k].pid = st.proc[i].pid;
        infos[k].usedGpuMemory = st.proc[i].bytes;
        infos[k].gpuInstanceId = 0xFFFFFFFFu; /* no MIG */
        infos[k].computeInstanceId = 0xFFFFFFFFu;
        k++;
    }
    *infoCount = k;
    return NVML_SUCCESS;
}

#define UINT_GETTER(fn, expr)                                                                  \
    EXPORT nvmlReturn_t fn(nvmlDevice_t device, unsigned *out)                                 \
    {                                                                                          \
        struct sim_state st;                                                                   \
        struct sim_device *d;                                                                  \
        nvmlReturn_t r = enter_device(&st, #fn, device, &d);                                   \
        if (r != NVML_SUCCESS) return r;                                                       \
        if (!out) return NVML_ERROR_INVALID_ARGUMENT;                                          \
        *out = (expr);                                                                         \
        return NVML_SUCCESS;                                                                   \
    }

UINT_GETTER(nvmlDeviceGetPowerUsage, d->power_usage_mw)
UINT_GETTER(nvmlDeviceGetPowerManagementLimit, d->power_limit_mw)
UINT_GETTER(nvmlDeviceGetPowerManagementDefaultLimit, d->power_default_mw)
UINT_GETTER(nvmlDeviceGetEnforcedPowerLimit,
            d->power_enforced_mw ? d->power_enforced_mw : d->power_limit_mw)

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
                                                                 unsigned *minLimit,
                                                                 unsigned *maxLimit)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetPowerManagementLimitConstraints", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!minLimit || !maxLimit) return NVML_ERROR_INVALID_ARGUMENT;
    *minLimit = d->power_min_mw;
    *maxLimit = d->power_max_mw;
    return NVML_SUCCESS;
}

/* The driver checks capable(CAP_SYS_ADMIN) first, then the constraints. The limit is kept in
 * the file, so it survives until a "driver reset" (nvml_state.driver_reset) puts the default
 * back, as a real driver reload or GPU reset does. */
EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned limit)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceSetPowerManagementLimit", device, &d);
    if (r != NVML_SUCCESS) return r;
    const char *path = getenv(STATE_ENV);
    if (!path || !*path) return NVML_ERROR_DRIVER_NOT_LOADED;
    int lock = lock_state(path);
    if (lock < 0) return NVML_ERROR_UNKNOWN;
    /* Decide on the state as it is under the lock, not as it was a moment ago. */
    if (load_state(&st) != 0 || !st.dev[device->index].present) r = NVML_ERROR_GPU_IS_LOST;
    else if (!st.dev[device->index].set_permission) r = NVML_ERROR_NO_PERMISSION;
    else if (limit < st.dev[device->index].power_min_mw || limit > st.dev[device->index].power_max_mw)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if (rewrite_power_limit(path, (int)device->index, limit) != 0) r = NVML_ERROR_UNKNOWN;
    close(lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned *temp)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetTemperature", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (sensor != 0 || !temp) return NVML_ERROR_INVALID_ARGUMENT; /* only NVML_TEMPERATURE_GPU */
    *temp = d->temp;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, "nvmlDeviceGetUtilizationRates", device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!util) return NVML_ERROR_INVALID_ARGUMENT;
    util->gpu = d->util_gpu;
    util->memory = d->util_mem;
    return NVML_SUCCESS;
}

static nvmlReturn_t clock_reasons(const char *symbol, nvmlDevice_t device,
                                  unsigned long long *reasons)
{
    struct sim_state st;
    struct sim_device *d;
    nvmlReturn_t r = enter_device(&st, symbol, device, &d);
    if (r != NVML_SUCCESS) return r;
    if (!reasons) return NVML_ERROR_INVALID_ARGUMENT;
    *reasons = d->reasons;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                           unsigned long long *reasons)
{
    return clock_reasons("nvmlDeviceGetCurrentClocksEventReasons", device, reasons);
}

/* The pre-R535 name of the same call, for older bindings. */
EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                              unsigned long long *reasons)
{
    return clock_reasons("nvmlDeviceGetCurrentClocksThrottleReasons", device, reasons);
}
