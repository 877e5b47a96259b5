// ssdoffload.io._native -- GIL-free O_DIRECT I/O engine for spilling host memory
// into preallocated spill files.
//
// Plain CPython C API (no pybind11, no torch headers), C++17, std::thread.
//
// Design
// ------
// * An Engine owns a fixed pool of worker threads and one FIFO queue
//   (std::deque under a mutex + condition variable) of chunk tasks.
// * Engine.write()/Engine.read() validate their arguments, check once per
//   request whether the fd is O_DIRECT (fcntl F_GETFL), split the request into
//   chunk_bytes pieces, queue them and return a Request at once.
// * The Request state is shared (std::shared_ptr) between the Python Request
//   object and the queued chunks, so dropping the Python object early is safe.
//   Chunks count down an atomic counter; the first failing chunk (lowest file
//   offset) is kept under the request mutex and later chunks are skipped; waiters sleep on a condition
//   variable with the GIL released.
// * Workers never touch Python objects or the GIL.  They run with all
//   asynchronous signals blocked, so signals are handled by Python threads and
//   SIGXFSZ can never kill the process from a worker: an over-RLIMIT_FSIZE
//   write simply fails with EFBIG.
// * O_DIRECT: every pwrite/pread on an O_DIRECT fd uses a 4096-aligned memory
//   address, length and file offset.  Aligned caller memory is used directly
//   (zero copy); anything else goes through a per-worker 4096-aligned bounce
//   buffer of chunk_bytes bytes, allocated once on first use.  Writes through
//   the bounce buffer are zero padded up to the next multiple of 4096 (the
//   file extent is reserved rounded up to 4096).
// * Engine.close() (and dealloc) stop accepting work, drain the queue and
//   join the workers with the GIL released.
// * fork(): an Engine/Request inherited by a child process has no worker
//   threads there; using it raises RuntimeError instead of hanging, and its
//   threads/mutexes are deliberately leaked rather than touched.
// * Chaos mode (SSDOFFLOAD_CHAOS=<seed>, read once at import; unset or empty:
//   off): every submission, chunk start and request completion sleeps a random
//   0-2 ms, and workers take a random queued chunk instead of the oldest, so
//   requests finish out of order.  Random numbers come from a per-thread
//   xorshift seeded from the seed and the thread's index.  Off, each of those
//   points costs one predictable branch on a global flag.  It exists to show
//   that nothing above depends on the timing or the order of completions.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define SSDOFFLOAD_HAVE_X86_CRC 1
#endif

#ifndef O_DIRECT
#error "ssdoffload.io._native needs O_DIRECT (Linux)"
#endif

namespace {

constexpr size_t kAlign = 4096;
constexpr int kMaxThreads = 256;
// Sentinel returned by read_full() for an EOF before the requested bytes.
constexpr int kShortRead = -1;
constexpr int kCrcMismatch = -2;  // a verified read whose CRC-32C is not the one written

inline size_t round_up_align(size_t n) { return (n + kAlign - 1) & ~(kAlign - 1); }
inline bool is_aligned(uintptr_t v) { return (v & (kAlign - 1)) == 0; }

// This process's id without a system call: getpid() is one (glibc no longer caches it), and
// the hot paths asked it per request and per chunk -- a tenth of the compute thread's time per
// offloaded tensor on a VM.  Set at import and by a fork handler in the child.
std::atomic<pid_t> g_pid{0};

void refresh_pid() { g_pid.store(getpid(), std::memory_order_relaxed); }

inline pid_t current_pid() { return g_pid.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------------------
// Chaos mode (see the header).  g_chaos is written once, at import, before
// any Engine exists; afterwards only read.
// ---------------------------------------------------------------------------

bool g_chaos = false;
uint64_t g_chaos_seed = 0;
std::atomic<uint64_t> g_chaos_threads{0};  // index of threads that are not workers

inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// xorshift64 state of this thread; 0: not seeded yet.
thread_local uint64_t t_chaos_state = 0;

void chaos_seed_thread(uint64_t index) {
    uint64_t s = splitmix64(g_chaos_seed ^ splitmix64(index));
    t_chaos_state = s != 0 ? s : 1;
}

uint64_t chaos_next() {
    // Workers are seeded by index when they start; other threads (submitters) on first use,
    // numbered from 1 << 32 in the order they first ask.
    if (t_chaos_state == 0)
        chaos_seed_thread((1ull << 32) + g_chaos_threads.fetch_add(1, std::memory_order_relaxed));
    uint64_t x = t_chaos_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t_chaos_state = x;
    return x;
}

void chaos_sleep_slow() {
    std::this_thread::sleep_for(std::chrono::microseconds(chaos_next() % 2001));
}

// A random pause of 0-2 ms in chaos mode; one predictable branch otherwise.
inline void chaos_sleep() {
    if (__builtin_expect(g_chaos, false)) chaos_sleep_slow();
}

// ---------------------------------------------------------------------------
// Request state shared between the Python Request object and queued chunks.
// ---------------------------------------------------------------------------

struct ChunkError {
    int err = 0;            // errno (EIO for a short read)
    bool short_read = false;
    const char* detail = nullptr;  // extra explanation appended to strerror
    size_t got = 0;         // bytes of the chunk read before EOF (short reads)
    size_t len = 0;         // chunk length
    long long off = 0;      // chunk file offset
    size_t index = 0;       // chunk index within the request
    bool crc_mismatch = false;
    uint32_t crc_expected = 0;
    uint32_t crc_got = 0;
};

struct RequestState {
    RequestState(bool is_write_, int fd_, uintptr_t address_, size_t nbytes_,
                 long long offset_, size_t nchunks_)
        : is_write(is_write_), fd(fd_), address(address_), nbytes(nbytes_),
          offset(offset_), nchunks(nchunks_), pid(current_pid()), remaining(nchunks_) {}

    const bool is_write;
    const int fd;
    const uintptr_t address;
    const size_t nbytes;
    const long long offset;
    const size_t nchunks;
    const pid_t pid;          // process that submitted the request
    bool direct = false;      // fd has O_DIRECT (set before queueing)
    // verify: a write copies each chunk into an aligned buffer, takes its CRC-32C there and
    // writes from there (the checksum is of exactly the bytes the drive got, even if the
    // caller's memory changes meanwhile); `crcs` gets one per chunk.  A read with `expected`
    // (one per chunk) checks each chunk it read and fails on a mismatch.
    bool verify = false;
    std::vector<uint32_t> crcs;      // writes with verify: filled by the chunk that owns the slot
    std::vector<uint32_t> expected;  // reads: empty = no check
    // CLOCK_MONOTONIC nanoseconds (the clock of Python's time.perf_counter): when the first
    // chunk started and when the last one finished (0: not yet).
    std::atomic<long long> start_ns{0};
    std::atomic<long long> end_ns{0};

    std::atomic<size_t> remaining;       // chunks not yet finished
    // Lowest index of a failed chunk (SIZE_MAX: none).  Chunks with a higher
    // index are skipped; lower ones still run, so the reported error is always
    // the lowest-offset failing chunk, whatever the scheduling.
    std::atomic<size_t> first_failed{SIZE_MAX};

    std::mutex mu;
    std::condition_variable cv;
    // Written under mu.  Read under mu, except in a forked child (no workers
    // exist there, and mu may have been copied in a locked state).
    std::atomic<bool> finished{false};
    bool has_error = false;              // guarded by mu
    ChunkError error;                    // guarded by mu
};

// ---------------------------------------------------------------------------
// Worker pool.
// ---------------------------------------------------------------------------

struct Task {
    std::shared_ptr<RequestState> req;
    size_t index = 0;
};

struct Pool {
    Pool(int nthreads_, size_t chunk_bytes_)
        : nthreads(nthreads_), chunk_bytes(chunk_bytes_), owner_pid(current_pid()) {}

    const int nthreads;
    const size_t chunk_bytes;
    const pid_t owner_pid;

    std::mutex mu;                 // guards queue and closed
    std::condition_variable cv;
    std::deque<Task> queue;
    bool closed = false;

    std::atomic<long long> pending{0};  // requests submitted and not finished

    std::mutex join_mu;            // serialises joining (concurrent close())
    std::vector<std::thread> threads;
};

int write_full(int fd, const char* buf, size_t len, long long off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, static_cast<off_t>(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EIO;
        done += static_cast<size_t>(n);
    }
    return 0;
}

// Reads up to `len` bytes; succeeds once at least `need` bytes were read
// (need < len only for the zero padding of an O_DIRECT bounce read).
int read_full(int fd, char* buf, size_t len, long long off, size_t need, bool direct,
              size_t* got) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return errno;
        }
        if (n == 0) break;  // EOF
        done += static_cast<size_t>(n);
        // An O_DIRECT read only stops at an unaligned length at end of file;
        // a further pread would be misaligned (EINVAL), so stop here.
        if (direct && !is_aligned(done)) break;
    }
    *got = done;
    return done >= need ? 0 : kShortRead;
}

struct Bounce {
    void* ptr = nullptr;
    ~Bounce() { std::free(ptr); }
};

long long monotonic_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

uint32_t crc32c_compute(const unsigned char* p, size_t n);  // below

// Copies n bytes of this process's memory from src to dst through the kernel
// (process_vm_readv on ourselves).  Returns 0, or EFAULT when part of src is no
// longer mapped: the compute thread may free a storage (resize_(0), as FSDP does)
// while we read it, and a plain memcpy would then kill the process with SIGSEGV.
// Freed-but-mapped memory is read as garbage; the caller detects that (the
// storage's address or size changed) and drops what it wrote.
int copy_from_own_memory(void* dst, const void* src, size_t n) {
    const pid_t self = current_pid();
    size_t done = 0;
    while (done < n) {
        struct iovec local = {static_cast<char*>(dst) + done, n - done};
        struct iovec remote = {const_cast<char*>(static_cast<const char*>(src)) + done, n - done};
        ssize_t got = process_vm_readv(self, &local, 1, &remote, 1, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == ENOSYS || errno == EPERM) {  // no such syscall here: plain copy
                std::memcpy(static_cast<char*>(dst) + done, static_cast<const char*>(src) + done, n - done);
                return 0;
            }
            return errno;
        }
        if (got == 0) return EFAULT;
        done += static_cast<size_t>(got);
    }
    return 0;
}

int ensure_bounce(const Pool& pool, Bounce& bounce) {
    if (bounce.ptr != nullptr) return 0;
    void* p = nullptr;
    int rc = posix_memalign(&p, kAlign, pool.chunk_bytes);
    if (rc != 0) return rc;
    bounce.ptr = p;
    return 0;
}

// A verified write: the chunk through the bounce buffer, its CRC-32C taken there.
int write_chunk_verified(const Pool& pool, RequestState& r, size_t index, char* mem, size_t len,
                         long long off, Bounce& bounce) {
    int rc = ensure_bounce(pool, bounce);
    if (rc != 0) return rc;
    char* bb = static_cast<char*>(bounce.ptr);
    rc = copy_from_own_memory(bb, mem, len);
    if (rc != 0) return rc;
    r.crcs[index] = crc32c_compute(reinterpret_cast<const unsigned char*>(bb), len);
    size_t out = len;
    if (r.direct) {
        out = round_up_align(len);  // <= chunk_bytes (a multiple of 4096)
        std::memset(bb + len, 0, out - len);
    }
    return write_full(r.fd, bb, out, off);
}

int run_chunk_plain(const Pool& pool, const RequestState& r, size_t index, Bounce& bounce,
                    size_t* got);

// Runs one chunk.  Returns 0 or an errno / kShortRead / kCrcMismatch; fills *got for reads
// and *crc_got for a mismatch.
int run_chunk_io(const Pool& pool, RequestState& r, size_t index, Bounce& bounce, size_t* got,
                 uint32_t* crc_got) {
    const size_t start = index * pool.chunk_bytes;
    const size_t len = std::min(pool.chunk_bytes, r.nbytes - start);
    char* mem = reinterpret_cast<char*>(r.address + start);
    const long long off = r.offset + static_cast<long long>(start);
    *got = 0;
    if (r.is_write && r.verify) return write_chunk_verified(pool, r, index, mem, len, off, bounce);
    int rc = run_chunk_plain(pool, r, index, bounce, got);
    if (rc != 0 || r.is_write || r.expected.empty()) return rc;
    const uint32_t crc = crc32c_compute(reinterpret_cast<const unsigned char*>(mem), len);
    if (crc != r.expected[index]) {
        *crc_got = crc;
        return kCrcMismatch;
    }
    return 0;
}

// One chunk as it is: zero-copy where aligned, the bounce buffer for the rest.
int run_chunk_plain(const Pool& pool, const RequestState& r, size_t index, Bounce& bounce,
                    size_t* got) {
    const size_t start = index * pool.chunk_bytes;
    const size_t len = std::min(pool.chunk_bytes, r.nbytes - start);
    char* mem = reinterpret_cast<char*>(r.address + start);
    const long long off = r.offset + static_cast<long long>(start);
    *got = 0;

    if (!r.direct) {
        if (r.is_write) return write_full(r.fd, mem, len, off);
        return read_full(r.fd, mem, len, off, len, false, got);
    }

    // O_DIRECT: zero-copy for the 4096-multiple prefix when the address is
    // aligned; the rest (everything when unaligned) through the bounce buffer.
    const size_t direct_len =
        is_aligned(reinterpret_cast<uintptr_t>(mem)) ? (len & ~(kAlign - 1)) : 0;
    if (direct_len > 0) {
        int rc = r.is_write ? write_full(r.fd, mem, direct_len, off)
                            : read_full(r.fd, mem, direct_len, off, direct_len, true, got);
        if (rc != 0) return rc;
    }
    if (direct_len == len) return 0;

    {
        int rc = ensure_bounce(pool, bounce);
        if (rc != 0) return rc;
    }
    char* bb = static_cast<char*>(bounce.ptr);
    const size_t tail = len - direct_len;
    const size_t padded = round_up_align(tail);  // <= chunk_bytes
    const long long tail_off = off + static_cast<long long>(direct_len);
    if (r.is_write) {
        int crc = copy_from_own_memory(bb, mem + direct_len, tail);
        if (crc != 0) return crc;
        std::memset(bb + tail, 0, padded - tail);
        return write_full(r.fd, bb, padded, tail_off);
    }
    size_t tail_got = 0;
    int rc = read_full(r.fd, bb, padded, tail_off, tail, true, &tail_got);
    *got = direct_len + std::min(tail_got, tail);
    if (rc != 0) return rc;
    std::memcpy(mem + direct_len, bb, tail);
    return 0;
}

void run_task(Pool& pool, Task& task, Bounce& bounce) {
    RequestState& r = *task.req;
    chaos_sleep();  // the chunk starts late
    long long unset = 0;
    r.start_ns.compare_exchange_strong(unset, monotonic_ns(), std::memory_order_relaxed);
    if (task.index < r.first_failed.load(std::memory_order_relaxed)) {
        size_t got = 0;
        uint32_t crc_got = 0;
        int rc = run_chunk_io(pool, r, task.index, bounce, &got, &crc_got);
        if (rc != 0) {
            const size_t start = task.index * pool.chunk_bytes;
            std::lock_guard<std::mutex> lk(r.mu);
            if (!r.has_error || task.index < r.error.index) {
                r.has_error = true;
                r.error.crc_mismatch = rc == kCrcMismatch;
                if (rc == kCrcMismatch) {
                    r.error.crc_expected = r.expected[task.index];
                    r.error.crc_got = crc_got;
                    r.error.detail = "CRC-32C of the data read is not the one written";
                }
                r.error.err = rc == kShortRead ? EIO : rc == kCrcMismatch ? EBADMSG : rc;
                r.error.short_read = rc == kShortRead;
                r.error.got = got;
                r.error.len = std::min(pool.chunk_bytes, r.nbytes - start);
                r.error.off = r.offset + static_cast<long long>(start);
                r.error.index = task.index;
                r.first_failed.store(task.index, std::memory_order_relaxed);
            }
        }
    }
    if (r.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        chaos_sleep();  // the completion is reported late
        r.end_ns.store(monotonic_ns(), std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lk(r.mu);
            // Both under mu: whoever sees the request finished (under mu) also
            // sees pending() decremented, and vice versa.
            pool.pending.fetch_sub(1, std::memory_order_seq_cst);
            r.finished.store(true, std::memory_order_release);
        }
        r.cv.notify_all();
    }
}

void worker_main(Pool* pool, int index) {
    Bounce bounce;
    if (g_chaos) chaos_seed_thread(static_cast<uint64_t>(index));
    for (;;) {
        Task task;
        {
            std::unique_lock<std::mutex> lk(pool->mu);
            pool->cv.wait(lk, [pool] { return pool->closed || !pool->queue.empty(); });
            if (pool->queue.empty()) return;  // closed and drained
            if (__builtin_expect(g_chaos, false) && pool->queue.size() > 1) {
                // Chaos: any queued chunk, not the oldest -- requests finish out of order.
                const size_t pick = static_cast<size_t>(chaos_next() % pool->queue.size());
                if (pick != 0) std::swap(pool->queue[pick], pool->queue.front());
            }
            task = std::move(pool->queue.front());
            pool->queue.pop_front();
        }
        run_task(*pool, task, bounce);
    }
}

// Stops accepting work, drains the queue and joins the workers.  Must be
// called with the GIL held; releases it while joining.
void pool_close(Pool* pool) {
    {
        std::lock_guard<std::mutex> lk(pool->mu);
        pool->closed = true;
    }
    pool->cv.notify_all();
    Py_BEGIN_ALLOW_THREADS
    {
        std::lock_guard<std::mutex> lk(pool->join_mu);
        for (auto& t : pool->threads) {
            if (t.joinable()) t.join();
        }
        pool->threads.clear();
    }
    Py_END_ALLOW_THREADS
}

// ---------------------------------------------------------------------------
// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
// ---------------------------------------------------------------------------

uint32_t g_crc_table[8][256];
bool g_crc_use_hw = false;

void crc32c_init_tables() {
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
        g_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
        for (int t = 1; t < 8; ++t) {
            uint32_t prev = g_crc_table[t - 1][i];
            g_crc_table[t][i] = (prev >> 8) ^ g_crc_table[0][prev & 0xFF];
        }
    }
}

// Slicing-by-8 software implementation.  `crc` is the running (inverted) value.
uint32_t crc32c_sw(uint32_t crc, const unsigned char* p, size_t n) {
    while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
        crc = (crc >> 8) ^ g_crc_table[0][(crc ^ *p++) & 0xFF];
        --n;
    }
    while (n >= 8) {
        uint32_t lo, hi;
        std::memcpy(&lo, p, 4);
        std::memcpy(&hi, p + 4, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= crc;
        crc = g_crc_table[7][lo & 0xFF] ^ g_crc_table[6][(lo >> 8) & 0xFF] ^
              g_crc_table[5][(lo >> 16) & 0xFF] ^ g_crc_table[4][lo >> 24] ^
              g_crc_table[3][hi & 0xFF] ^ g_crc_table[2][(hi >> 8) & 0xFF] ^
              g_crc_table[1][(hi >> 16) & 0xFF] ^ g_crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0) crc = (crc >> 8) ^ g_crc_table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

// Shifting a CRC register over zero bytes: crc32c of (state, then n zero bytes) is linear in the
// state, so for a fixed n it is four table lookups (one per byte of the state).  The
// interleaved hardware CRC below computes three independent streams and joins them with these.
struct Crc32cShift {
    uint32_t t[4][256];
};
Crc32cShift g_shift_long, g_shift_short;
constexpr size_t kCrcLong = 8192;   // per stream, in bytes (a multiple of 8)
constexpr size_t kCrcShort = 256;

uint32_t crc32c_zeros_slow(uint32_t crc, size_t n) {
    while (n-- > 0) crc = (crc >> 8) ^ g_crc_table[0][crc & 0xFF];
    return crc;
}

void crc32c_init_shift(Crc32cShift* s, size_t n) {
    for (int k = 0; k < 4; ++k)
        for (uint32_t b = 0; b < 256; ++b) s->t[k][b] = crc32c_zeros_slow(b << (8 * k), n);
}

inline uint32_t crc32c_shift(const Crc32cShift& s, uint32_t crc) {
    return s.t[0][crc & 0xFF] ^ s.t[1][(crc >> 8) & 0xFF] ^ s.t[2][(crc >> 16) & 0xFF] ^ s.t[3][crc >> 24];
}

#ifdef SSDOFFLOAD_HAVE_X86_CRC
// SSE4.2 crc32 instruction (same polynomial); chosen at import time when the
// CPU supports it, unless SSDOFFLOAD_CRC32C_SOFTWARE=1 is set.  The instruction has a latency of
// three cycles and a throughput of one: three independent streams keep it busy (3x a single
// chain), joined by shifting the earlier streams' CRCs over the later streams' lengths.
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(uint32_t crc, const unsigned char* p,
                                                      size_t n) {
    while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
        crc = _mm_crc32_u8(crc, *p++);
        --n;
    }
#if defined(__x86_64__)
    for (size_t block : {kCrcLong, kCrcShort}) {
        const Crc32cShift& shift = block == kCrcLong ? g_shift_long : g_shift_short;
        while (n >= 3 * block) {
            uint64_t c0 = crc, c1 = 0, c2 = 0;
            const unsigned char* end = p + block;
            do {
                uint64_t v0, v1, v2;
                std::memcpy(&v0, p, 8);
                std::memcpy(&v1, p + block, 8);
                std::memcpy(&v2, p + 2 * block, 8);
                c0 = _mm_crc32_u64(c0, v0);
                c1 = _mm_crc32_u64(c1, v1);
                c2 = _mm_crc32_u64(c2, v2);
                p += 8;
            } while (p < end);
            crc = crc32c_shift(shift, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
            crc = crc32c_shift(shift, crc) ^ static_cast<uint32_t>(c2);
            p += 2 * block;
            n -= 3 * block;
        }
    }
    uint64_t c64 = crc;
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    crc = static_cast<uint32_t>(c64);
#endif
    while (n-- > 0) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

uint32_t crc32c_compute(const unsigned char* p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
#ifdef SSDOFFLOAD_HAVE_X86_CRC
    if (g_crc_use_hw) return ~crc32c_hw(crc, p, n);
#endif
    return ~crc32c_sw(crc, p, n);
}

// ---------------------------------------------------------------------------
// Python helpers.
// ---------------------------------------------------------------------------

PyTypeObject* g_engine_type = nullptr;
PyTypeObject* g_request_type = nullptr;

// Converts an int-like object to a C integer; ValueError naming `name` when
// out of range (TypeError for non-integers).
bool as_long_long(PyObject* obj, const char* name, long long* out) {
    PyObject* idx = PyNumber_Index(obj);
    if (idx == nullptr) return false;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    if (overflow != 0) {
        PyErr_Format(PyExc_ValueError, "%s out of range, got %R", name, idx);
        Py_DECREF(idx);
        return false;
    }
    Py_DECREF(idx);
    if (v == -1 && PyErr_Occurred()) return false;
    *out = v;
    return true;
}

bool as_address(PyObject* obj, uintptr_t* out) {
    PyObject* idx = PyNumber_Index(obj);
    if (idx == nullptr) return false;
    unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "address must be a non-negative integer below 2**64, got %R", idx);
        }
        Py_DECREF(idx);
        return false;
    }
    Py_DECREF(idx);
    if (static_cast<unsigned long long>(static_cast<uintptr_t>(v)) != v) {
        PyErr_Format(PyExc_ValueError, "address out of range, got %llu", v);
        return false;
    }
    *out = static_cast<uintptr_t>(v);
    return true;
}

// ---------------------------------------------------------------------------
// Request type.
// ---------------------------------------------------------------------------

struct RequestObject {
    PyObject_HEAD
    std::shared_ptr<RequestState> state;  // placement-constructed
    PyObject* path;                       // str/bytes or NULL (no filename)
};

// Returns 1 when finished, 0 on timeout, -1 with an exception set.
// timeout < 0 means wait forever.  Waits with the GIL released, in slices, so
// that KeyboardInterrupt and other signals are honoured.
int request_wait(RequestState& r, double timeout) {
    if (r.pid != current_pid()) {
        if (r.finished.load(std::memory_order_acquire)) return 1;
        PyErr_SetString(PyExc_RuntimeError,
                        "request was submitted in another process (before fork) and "
                        "cannot complete in this one");
        return -1;
    }
    {
        std::lock_guard<std::mutex> lk(r.mu);  // short critical sections only
        if (r.finished.load(std::memory_order_relaxed)) return 1;
    }
    if (timeout == 0.0) return 0;

    using clock = std::chrono::steady_clock;
    const bool forever = timeout < 0.0;
    const clock::time_point deadline =
        forever ? clock::time_point::max()
                : clock::now() + std::chrono::duration_cast<clock::duration>(
                                     std::chrono::duration<double>(timeout));
    const auto slice = std::chrono::milliseconds(100);
    for (;;) {
        bool fin = false;
        Py_BEGIN_ALLOW_THREADS
        {
            std::unique_lock<std::mutex> lk(r.mu);
            clock::time_point now = clock::now();
            clock::time_point until = (forever || deadline - now > slice) ? now + slice : deadline;
            r.cv.wait_until(lk, until,
                            [&r] { return r.finished.load(std::memory_order_relaxed); });
            fin = r.finished.load(std::memory_order_relaxed);
        }
        Py_END_ALLOW_THREADS
        if (fin) return 1;
        if (!forever && clock::now() >= deadline) return 0;
        if (PyErr_CheckSignals() < 0) return -1;
    }
}

// A finished request's error: true and *e filled when it failed.
bool request_error(RequestState& r, ChunkError* e) {
    if (r.pid == current_pid()) {
        std::lock_guard<std::mutex> lk(r.mu);
        *e = r.error;
        return r.has_error;
    }
    *e = r.error;  // a forked child: no workers here, mu may have been copied locked
    return r.has_error;
}

void request_dealloc(PyObject* self) {
    RequestObject* ro = reinterpret_cast<RequestObject*>(self);
    ro->state.~shared_ptr<RequestState>();
    Py_CLEAR(ro->path);
    PyTypeObject* tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(request_done_doc,
"done($self, /)\n--\n\n"
"Non-blocking: True when every chunk of the request has finished\n"
"(successfully or not).");

PyObject* request_done(PyObject* self, PyObject* /*unused*/) {
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    int rc = request_wait(r, 0.0);
    if (rc < 0) return nullptr;
    return PyBool_FromLong(rc);
}

// Parses an optional timeout: None -> -1 (forever), negative -> 0.
bool parse_timeout(PyObject* obj, double* out) {
    if (obj == nullptr || obj == Py_None) {
        *out = -1.0;
        return true;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) return false;
    if (std::isnan(t)) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return false;
    }
    if (t > 1e8) t = -1.0;          // effectively forever (avoid clock overflow)
    else if (t < 0.0) t = 0.0;      // like threading.Event.wait
    *out = t;
    return true;
}

PyDoc_STRVAR(request_wait_doc,
"wait($self, /, timeout=None)\n--\n\n"
"Blocks until the request has finished or `timeout` seconds have passed\n"
"(None: no limit; 0 or negative: just poll).  The GIL is released while\n"
"waiting and signals (KeyboardInterrupt) are checked every 100 ms.  Returns\n"
"True when finished, False on timeout.  Does not raise I/O errors; use\n"
"result() for that.  If interrupted (KeyboardInterrupt) the request keeps\n"
"running in the background.");

PyObject* request_wait_method(PyObject* self, PyObject* args, PyObject* kwds) {
    static const char* kwlist[] = {"timeout", nullptr};
    PyObject* timeout_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:wait", const_cast<char**>(kwlist),
                                     &timeout_obj))
        return nullptr;
    double timeout;
    if (!parse_timeout(timeout_obj, &timeout)) return nullptr;
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    int rc = request_wait(r, timeout);
    if (rc < 0) return nullptr;
    return PyBool_FromLong(rc);
}

PyDoc_STRVAR(request_result_doc,
"result($self, /)\n--\n\n"
"Blocks (GIL released) until the request has finished, then returns nbytes,\n"
"or raises OSError(errno, \"<strerror>: <write|read> of N bytes at offset O\",\n"
"path) for the first failing chunk (lowest file offset), where N and O are\n"
"that chunk's length and file offset.  A read that hits end of file early\n"
"fails with errno EIO and \"short read\" in the message.  `filename` is the\n"
"`path` given at submission (None when it was empty).  Later chunks of a\n"
"failed request (higher offsets) are skipped.");

PyObject* request_result(PyObject* self, PyObject* /*unused*/) {
    RequestObject* ro = reinterpret_cast<RequestObject*>(self);
    RequestState& r = *ro->state;
    int rc = request_wait(r, -1.0);
    if (rc < 0) return nullptr;

    ChunkError e;
    if (!request_error(r, &e)) return PyLong_FromSize_t(r.nbytes);

    char errbuf[256];
    std::string reason;
    if (e.short_read) {
        reason = "Input/output error (short read: end of file after " +
                 std::to_string(e.got) + " of " + std::to_string(e.len) + " bytes)";
    } else {
        // GNU strerror_r returns a char* (possibly not errbuf).
        reason = strerror_r(e.err, errbuf, sizeof(errbuf));
        if (e.detail != nullptr) reason = reason + " (" + e.detail + ")";
    }
    std::string msg = reason + ": " + (r.is_write ? "write" : "read") + " of " +
                      std::to_string(e.len) + " bytes at offset " + std::to_string(e.off);

    PyObject* exc;
    if (ro->path != nullptr)
        exc = PyObject_CallFunction(PyExc_OSError, "isO", e.err, msg.c_str(), ro->path);
    else
        exc = PyObject_CallFunction(PyExc_OSError, "is", e.err, msg.c_str());
    if (exc == nullptr) return nullptr;
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
    return nullptr;
}

PyDoc_STRVAR(request_checksums_doc,
"checksums($self, /)\n--\n\n"
"Blocks (GIL released) until the request has finished.  For a write submitted\n"
"with verify=True: the CRC-32C of each chunk written (a list, to be given back\n"
"to read(expected=...)); None otherwise.  Call result() for errors first.");

PyObject* request_checksums(PyObject* self, PyObject* /*unused*/) {
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    int rc = request_wait(r, -1.0);
    if (rc < 0) return nullptr;
    if (!r.verify) Py_RETURN_NONE;
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(r.crcs.size()));
    if (out == nullptr) return nullptr;
    for (size_t i = 0; i < r.crcs.size(); ++i) {
        PyObject* v = PyLong_FromUnsignedLong(r.crcs[i]);
        if (v == nullptr) {
            Py_DECREF(out);
            return nullptr;
        }
        PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), v);
    }
    return out;
}

PyDoc_STRVAR(request_times_doc,
"times($self, /)\n--\n\n"
"Non-blocking: (start, end) in seconds of the clock of time.perf_counter() --\n"
"when the first chunk began and the last one finished -- or None while the\n"
"request has not finished (or had no chunk).");

PyObject* request_times(PyObject* self, PyObject* /*unused*/) {
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    if (!r.finished.load(std::memory_order_acquire)) Py_RETURN_NONE;
    const long long a = r.start_ns.load(std::memory_order_relaxed);
    const long long b = r.end_ns.load(std::memory_order_relaxed);
    if (a == 0 || b == 0) Py_RETURN_NONE;
    return Py_BuildValue("(dd)", a / 1e9, b / 1e9);
}

PyDoc_STRVAR(request_integrity_doc,
"integrity($self, /)\n--\n\n"
"Non-blocking: for a finished read that failed its check, (file offset of the\n"
"chunk, expected CRC-32C, CRC-32C of what was read); None otherwise.");

PyObject* request_integrity(PyObject* self, PyObject* /*unused*/) {
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    if (!r.finished.load(std::memory_order_acquire)) Py_RETURN_NONE;
    ChunkError e;
    if (!request_error(r, &e) || !e.crc_mismatch) Py_RETURN_NONE;
    return Py_BuildValue("(Lkk)", e.off, static_cast<unsigned long>(e.crc_expected),
                         static_cast<unsigned long>(e.crc_got));
}

PyObject* request_get_nbytes(PyObject* self, void* /*closure*/) {
    return PyLong_FromSize_t(reinterpret_cast<RequestObject*>(self)->state->nbytes);
}

PyObject* request_get_offset(PyObject* self, void* /*closure*/) {
    return PyLong_FromLongLong(reinterpret_cast<RequestObject*>(self)->state->offset);
}

PyObject* request_repr(PyObject* self) {
    RequestState& r = *reinterpret_cast<RequestObject*>(self)->state;
    bool fin = r.finished.load(std::memory_order_acquire);
    return PyUnicode_FromFormat("<ssdoffload.io._native.Request %s of %zu bytes at offset %lld, %s>",
                                r.is_write ? "write" : "read", r.nbytes, r.offset,
                                fin ? "done" : "pending");
}

PyMethodDef request_methods[] = {
    {"done", request_done, METH_NOARGS, request_done_doc},
    {"wait", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(request_wait_method)),
     METH_VARARGS | METH_KEYWORDS, request_wait_doc},
    {"result", request_result, METH_NOARGS, request_result_doc},
    {"checksums", request_checksums, METH_NOARGS, request_checksums_doc},
    {"times", request_times, METH_NOARGS, request_times_doc},
    {"integrity", request_integrity, METH_NOARGS, request_integrity_doc},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef request_getset[] = {
    {"nbytes", request_get_nbytes, nullptr,
     PyDoc_STR("Number of bytes of the request (read-only)."), nullptr},
    {"offset", request_get_offset, nullptr,
     PyDoc_STR("File offset of the request, a multiple of 4096 (read-only)."), nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyDoc_STRVAR(request_doc,
"Handle of one asynchronous Engine.write()/Engine.read().\n"
"\n"
"Not constructible from Python.  The I/O continues (and the buffer must stay\n"
"alive) even if this object is dropped before the request finishes.");

PyType_Slot request_slots[] = {
    {Py_tp_dealloc, reinterpret_cast<void*>(request_dealloc)},
    {Py_tp_repr, reinterpret_cast<void*>(request_repr)},
    {Py_tp_methods, request_methods},
    {Py_tp_getset, request_getset},
    {Py_tp_doc, const_cast<char*>(request_doc)},
    {0, nullptr},
};

PyType_Spec request_spec = {
    "ssdoffload.io._native.Request",
    static_cast<int>(sizeof(RequestObject)),
    0,
#ifdef Py_TPFLAGS_DISALLOW_INSTANTIATION
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
#else
    Py_TPFLAGS_DEFAULT,
#endif
    request_slots,
};

PyObject* new_request(std::shared_ptr<RequestState> state, PyObject* path) {
    PyObject* obj = g_request_type->tp_alloc(g_request_type, 0);
    if (obj == nullptr) return nullptr;
    RequestObject* ro = reinterpret_cast<RequestObject*>(obj);
    new (&ro->state) std::shared_ptr<RequestState>(std::move(state));
    Py_XINCREF(path);
    ro->path = path;
    return obj;
}

// ---------------------------------------------------------------------------
// Engine type.
// ---------------------------------------------------------------------------

struct EngineObject {
    PyObject_HEAD
    Pool* pool;
};

bool engine_check_process(EngineObject* self) {
    if (self->pool->owner_pid != current_pid()) {
        PyErr_Format(PyExc_RuntimeError,
                     "engine was created in process %ld and cannot be used after fork",
                     static_cast<long>(self->pool->owner_pid));
        return false;
    }
    return true;
}

PyObject* engine_new(PyTypeObject* type, PyObject* args, PyObject* kwds) {
    static const char* kwlist[] = {"threads", "chunk_bytes", nullptr};
    PyObject* threads_obj = nullptr;
    PyObject* chunk_obj = nullptr;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:Engine", const_cast<char**>(kwlist),
                                     &threads_obj, &chunk_obj))
        return nullptr;
    long long threads = 4;
    long long chunk = 4LL << 20;
    if (threads_obj != nullptr && !as_long_long(threads_obj, "threads", &threads)) return nullptr;
    if (chunk_obj != nullptr && !as_long_long(chunk_obj, "chunk_bytes", &chunk)) return nullptr;
    if (threads < 1 || threads > kMaxThreads) {
        PyErr_Format(PyExc_ValueError, "threads must be in [1, %d], got %lld", kMaxThreads,
                     threads);
        return nullptr;
    }
    if (chunk <= 0 || chunk % static_cast<long long>(kAlign) != 0 ||
        static_cast<unsigned long long>(chunk) > static_cast<unsigned long long>(PY_SSIZE_T_MAX)) {
        PyErr_Format(PyExc_ValueError,
                     "chunk_bytes must be a positive multiple of %d, got %lld",
                     static_cast<int>(kAlign), chunk);
        return nullptr;
    }

    EngineObject* self = reinterpret_cast<EngineObject*>(type->tp_alloc(type, 0));
    if (self == nullptr) return nullptr;
    self->pool = nullptr;
    Pool* pool = new (std::nothrow) Pool(static_cast<int>(threads), static_cast<size_t>(chunk));
    if (pool == nullptr) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->pool = pool;

    // Workers run with asynchronous signals blocked (they are delivered to
    // Python threads instead); synchronous fault signals stay unblocked so
    // that crashes are still reported.  A blocked SIGXFSZ cannot kill the
    // process: the pwrite just fails with EFBIG.
    sigset_t block, old;
    sigfillset(&block);
    for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT})
        sigdelset(&block, s);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int start_err = 0;
    try {
        pool->threads.reserve(static_cast<size_t>(threads));
        for (long long i = 0; i < threads; ++i) {
            pool->threads.emplace_back(worker_main, pool, static_cast<int>(i));
            pthread_setname_np(pool->threads.back().native_handle(), "ssdoffload-io");
        }
    } catch (const std::system_error& e) {
        start_err = e.code().value() ? e.code().value() : EAGAIN;
    } catch (const std::bad_alloc&) {
        start_err = ENOMEM;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (start_err != 0) {
        pool_close(pool);
        Py_DECREF(self);  // deletes the pool
        errno = start_err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return reinterpret_cast<PyObject*>(self);
}

void engine_dealloc(PyObject* obj) {
    EngineObject* self = reinterpret_cast<EngineObject*>(obj);
    if (self->pool != nullptr) {
        if (self->pool->owner_pid == current_pid()) {
            pool_close(self->pool);
            delete self->pool;
        }
        // In a forked child the worker threads do not exist and the pool's
        // mutexes may be in any state: leak the pool instead of touching it.
        self->pool = nullptr;
    }
    PyTypeObject* tp = Py_TYPE(obj);
    tp->tp_free(obj);
    Py_DECREF(tp);
}

PyObject* engine_submit(EngineObject* self, PyObject* args, PyObject* kwds, bool is_write) {
    static const char* kwlist[] = {"fd", "address", "nbytes", "offset", "path", "verify", "expected",
                                   nullptr};
    int fd;
    PyObject* address_obj;
    PyObject* nbytes_obj;
    PyObject* offset_obj;
    PyObject* path_obj = nullptr;
    int verify = 0;
    PyObject* expected_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, is_write ? "iOOO|O$pO:write" : "iOOO|O$pO:read",
                                     const_cast<char**>(kwlist), &fd, &address_obj,
                                     &nbytes_obj, &offset_obj, &path_obj, &verify, &expected_obj))
        return nullptr;
    if (!engine_check_process(self)) return nullptr;
    if (is_write && expected_obj != Py_None) {
        PyErr_SetString(PyExc_TypeError, "write() takes verify=True, not expected= (that is read()'s)");
        return nullptr;
    }
    if (!is_write && verify) {
        PyErr_SetString(PyExc_TypeError,
                        "read() takes expected= (the checksums a verified write returned), not verify=");
        return nullptr;
    }

    uintptr_t address;
    long long nbytes_ll, offset;
    if (!as_address(address_obj, &address)) return nullptr;
    if (!as_long_long(nbytes_obj, "nbytes", &nbytes_ll)) return nullptr;
    if (!as_long_long(offset_obj, "offset", &offset)) return nullptr;
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "fd must be a non-negative file descriptor, got %d", fd);
        return nullptr;
    }
    if (nbytes_ll < 0) {
        PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %lld", nbytes_ll);
        return nullptr;
    }
    if (offset < 0 || offset % static_cast<long long>(kAlign) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "offset must be a non-negative multiple of %d, got %lld",
                     static_cast<int>(kAlign), offset);
        return nullptr;
    }
    const size_t nbytes = static_cast<size_t>(nbytes_ll);
    if (nbytes > 0 && address == 0) {
        PyErr_SetString(PyExc_ValueError, "address must not be 0 (NULL) when nbytes > 0");
        return nullptr;
    }
    if (nbytes > 0 && (address + nbytes < address ||
                       static_cast<unsigned long long>(offset) + round_up_align(nbytes) >
                           static_cast<unsigned long long>(LLONG_MAX))) {
        PyErr_SetString(PyExc_ValueError, "address/offset + nbytes overflows");
        return nullptr;
    }

    // path: only used in error messages.
    PyObject* path = nullptr;  // new reference or NULL
    if (path_obj != nullptr && path_obj != Py_None) {
        path = PyOS_FSPath(path_obj);
        if (path == nullptr) return nullptr;
        if ((PyUnicode_Check(path) && PyUnicode_GET_LENGTH(path) == 0) ||
            (PyBytes_Check(path) && PyBytes_GET_SIZE(path) == 0))
            Py_CLEAR(path);
    }

    Pool* pool = self->pool;
    const size_t nchunks = nbytes == 0 ? 0 : (nbytes - 1) / pool->chunk_bytes + 1;
    std::shared_ptr<RequestState> state;
    try {
        state = std::make_shared<RequestState>(is_write, fd, address, nbytes, offset, nchunks);
        state->verify = verify != 0;
        if (state->verify) state->crcs.assign(nchunks, 0);
    } catch (const std::bad_alloc&) {
        Py_XDECREF(path);
        return PyErr_NoMemory();
    }
    if (expected_obj != Py_None) {
        PyObject* seq = PySequence_Fast(expected_obj, "expected must be a sequence of CRC-32C values");
        if (seq == nullptr) {
            Py_XDECREF(path);
            return nullptr;
        }
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (static_cast<size_t>(n) != nchunks) {
            PyErr_Format(PyExc_ValueError,
                         "expected has %zd checksums; a request of %zu bytes in %zu-byte chunks has %zu",
                         n, nbytes, pool->chunk_bytes, nchunks);
            Py_DECREF(seq);
            Py_XDECREF(path);
            return nullptr;
        }
        state->expected.resize(nchunks);
        for (Py_ssize_t i = 0; i < n; ++i) {
            unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
            if ((v == static_cast<unsigned long>(-1) && PyErr_Occurred()) || v > 0xFFFFFFFFul) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a checksum is not a 32-bit value");
                Py_DECREF(seq);
                Py_XDECREF(path);
                return nullptr;
            }
            state->expected[i] = static_cast<uint32_t>(v);
        }
        Py_DECREF(seq);
    }

    int fcntl_err = 0;
    const char* fcntl_detail = nullptr;
    if (nchunks > 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0) {
            fcntl_err = errno;
        } else if (is_write && (fl & O_APPEND) != 0) {
            // Linux pwrite() ignores the offset on O_APPEND descriptors.
            fcntl_err = EINVAL;
            fcntl_detail = "fd has O_APPEND, pwrite would ignore the offset";
        } else {
            state->direct = (fl & O_DIRECT) != 0;
        }
    }

    PyObject* req = new_request(state, path);
    Py_XDECREF(path);
    if (req == nullptr) return nullptr;
    if (__builtin_expect(g_chaos, false)) {
        Py_BEGIN_ALLOW_THREADS
        chaos_sleep_slow();  // the submission arrives late
        Py_END_ALLOW_THREADS
    }

    bool closed = false;
    bool nomem = false;
    {
        std::lock_guard<std::mutex> lk(pool->mu);
        if (pool->closed) {
            closed = true;
        } else if (nchunks == 0) {
            state->finished.store(true, std::memory_order_release);
        } else if (fcntl_err != 0) {
            // Report a bad fd through result(), like any other I/O error.
            std::lock_guard<std::mutex> rlk(state->mu);
            state->has_error = true;
            state->error.err = fcntl_err;
            state->error.detail = fcntl_detail;
            state->error.len = std::min(pool->chunk_bytes, nbytes);
            state->error.off = offset;
            state->remaining.store(0);
            state->finished.store(true, std::memory_order_release);
        } else {
            size_t pushed = 0;
            try {
                for (; pushed < nchunks; ++pushed) pool->queue.push_back(Task{state, pushed});
                pool->pending.fetch_add(1, std::memory_order_seq_cst);
            } catch (const std::bad_alloc&) {
                while (pushed-- > 0) pool->queue.pop_back();
                nomem = true;
            }
        }
    }
    if (closed) {
        Py_DECREF(req);
        PyErr_SetString(PyExc_RuntimeError, "engine is closed");
        return nullptr;
    }
    if (nomem) {
        Py_DECREF(req);
        return PyErr_NoMemory();
    }
    if (nchunks > 1)
        pool->cv.notify_all();
    else if (nchunks == 1)
        pool->cv.notify_one();
    return req;
}

PyDoc_STRVAR(engine_write_doc,
"write($self, /, fd, address, nbytes, offset, path='', *, verify=False)\n--\n\n"
"Non-blocking: queues a write of `nbytes` bytes of host memory starting at\n"
"the integer `address` (e.g. tensor.data_ptr(), arr.ctypes.data) to file\n"
"descriptor `fd` at file `offset`, split into chunk_bytes pieces, and returns\n"
"a Request at once.  The memory and the fd must stay valid until the request\n"
"has finished.\n"
"\n"
"`offset` must be a multiple of 4096 (ValueError otherwise); nbytes >= 0\n"
"(0 completes immediately); address != 0 when nbytes > 0.  Whether `fd` is\n"
"O_DIRECT is checked once per request.  On an O_DIRECT fd every pwrite uses a\n"
"4096-aligned address, length and offset: a 4096-aligned address is written\n"
"zero-copy for whole 4096-byte blocks; otherwise the data goes through a\n"
"per-worker aligned bounce buffer and the tail is zero padded up to the next\n"
"multiple of 4096, so up to round_up(nbytes, 4096) bytes of the file are\n"
"written.  On a buffered fd exactly `nbytes` bytes are written from the\n"
"caller's memory.  A write to an O_APPEND fd fails with EINVAL (Linux\n"
"pwrite would ignore the offset).  `path` is only used in error messages\n"
"(OSError.filename).  Raises RuntimeError('engine is closed') after close().\n"
"\n"
"verify=True: every chunk is copied into the aligned buffer (through the kernel:\n"
"memory freed meanwhile is EFAULT, not a crash), its CRC-32C taken there and\n"
"written from there, so the checksum describes exactly the bytes written even\n"
"if the caller's memory changes meanwhile; Request.checksums() returns them.");

PyObject* engine_write(PyObject* self, PyObject* args, PyObject* kwds) {
    return engine_submit(reinterpret_cast<EngineObject*>(self), args, kwds, true);
}

PyDoc_STRVAR(engine_read_doc,
"read($self, /, fd, address, nbytes, offset, path='', *, expected=None)\n--\n\n"
"Non-blocking: queues a read of `nbytes` bytes from file descriptor `fd` at\n"
"file `offset` into host memory starting at the integer `address`, split\n"
"into chunk_bytes pieces, and returns a Request at once.  The memory and the\n"
"fd must stay valid until the request has finished.\n"
"\n"
"`offset` must be a multiple of 4096 (ValueError otherwise); nbytes >= 0\n"
"(0 completes immediately); address != 0 when nbytes > 0.  On an O_DIRECT fd\n"
"every pread uses a 4096-aligned address, length and offset: a 4096-aligned\n"
"address is read zero-copy for whole 4096-byte blocks; otherwise the\n"
"rounded-up length is read into a per-worker aligned bounce buffer and only\n"
"the requested bytes are copied out (the caller's memory beyond nbytes is\n"
"never written).  Reaching end of file before `nbytes` bytes is an error\n"
"(EIO, 'short read').  `path` is only used in error messages.\n"
"Raises RuntimeError('engine is closed') after close().\n"
"\n"
"expected: the checksums a verified write returned (one per chunk); each chunk\n"
"read is checked, and a mismatch fails the request with EBADMSG\n"
"(Request.integrity() then says where and what).");

PyObject* engine_read(PyObject* self, PyObject* args, PyObject* kwds) {
    return engine_submit(reinterpret_cast<EngineObject*>(self), args, kwds, false);
}

PyDoc_STRVAR(engine_pending_doc,
"pending($self, /)\n--\n\n"
"Non-blocking: number of requests submitted and not yet finished.");

PyObject* engine_pending(PyObject* self, PyObject* /*unused*/) {
    EngineObject* e = reinterpret_cast<EngineObject*>(self);
    return PyLong_FromLongLong(e->pool->pending.load(std::memory_order_seq_cst));
}

PyDoc_STRVAR(engine_close_doc,
"close($self, /)\n--\n\n"
"Blocks: stops accepting new requests, lets the workers finish every queued\n"
"chunk, and joins the worker threads with the GIL released.  Idempotent;\n"
"also done when the engine is garbage collected.  Requests submitted before\n"
"close() complete normally.  Afterwards write()/read() raise\n"
"RuntimeError('engine is closed').");

PyObject* engine_close(PyObject* self, PyObject* /*unused*/) {
    EngineObject* e = reinterpret_cast<EngineObject*>(self);
    if (!engine_check_process(e)) return nullptr;
    pool_close(e->pool);
    Py_RETURN_NONE;
}

PyObject* engine_get_threads(PyObject* self, void* /*closure*/) {
    return PyLong_FromLong(reinterpret_cast<EngineObject*>(self)->pool->nthreads);
}

PyObject* engine_get_chunk_bytes(PyObject* self, void* /*closure*/) {
    return PyLong_FromSize_t(reinterpret_cast<EngineObject*>(self)->pool->chunk_bytes);
}

PyObject* engine_repr(PyObject* self) {
    Pool* p = reinterpret_cast<EngineObject*>(self)->pool;
    bool closed;
    if (p->owner_pid == current_pid()) {
        std::lock_guard<std::mutex> lk(p->mu);
        closed = p->closed;
    } else {
        closed = true;
    }
    return PyUnicode_FromFormat("<ssdoffload.io._native.Engine threads=%d chunk_bytes=%zu%s>",
                                p->nthreads, p->chunk_bytes, closed ? " closed" : "");
}

PyMethodDef engine_methods[] = {
    {"write", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_write)),
     METH_VARARGS | METH_KEYWORDS, engine_write_doc},
    {"read", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_read)),
     METH_VARARGS | METH_KEYWORDS, engine_read_doc},
    {"pending", engine_pending, METH_NOARGS, engine_pending_doc},
    {"close", engine_close, METH_NOARGS, engine_close_doc},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef engine_getset[] = {
    {"threads", engine_get_threads, nullptr, PyDoc_STR("Number of worker threads (read-only)."),
     nullptr},
    {"chunk_bytes", engine_get_chunk_bytes, nullptr,
     PyDoc_STR("Size of the pieces requests are split into, a multiple of 4096 (read-only)."),
     nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyDoc_STRVAR(engine_doc,
"Engine(threads=4, chunk_bytes=4194304)\n--\n\n"
"Pool of `threads` worker threads doing pwrite/pread of host memory to file\n"
"descriptors without holding the GIL, honouring O_DIRECT alignment (4096).\n"
"threads must be in [1, 256] and chunk_bytes a positive multiple of 4096\n"
"(ValueError otherwise).  Requests are split into chunk_bytes pieces served\n"
"in FIFO order (in random order in chaos mode: SSDOFFLOAD_CHAOS).  Each worker allocates one 4096-aligned bounce buffer of\n"
"chunk_bytes bytes the first time it needs one (unaligned O_DIRECT I/O).\n"
"Construction does not block on I/O.");

PyType_Slot engine_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(engine_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(engine_dealloc)},
    {Py_tp_repr, reinterpret_cast<void*>(engine_repr)},
    {Py_tp_methods, engine_methods},
    {Py_tp_getset, engine_getset},
    {Py_tp_doc, const_cast<char*>(engine_doc)},
    {0, nullptr},
};

PyType_Spec engine_spec = {
    "ssdoffload.io._native.Engine",
    static_cast<int>(sizeof(EngineObject)),
    0,
    Py_TPFLAGS_DEFAULT,
    engine_slots,
};

// ---------------------------------------------------------------------------
// Module.
// ---------------------------------------------------------------------------

PyDoc_STRVAR(crc32c_doc,
"crc32c(address, nbytes)\n--\n\n"
"Blocks: CRC-32C (Castagnoli) of `nbytes` bytes of host memory at the integer\n"
"`address`, e.g. crc32c of b'123456789' is 0xE3069283.  No alignment\n"
"requirement.  The GIL is released for buffers of 256 KiB or more.  Uses the\n"
"SSE4.2 crc32 instruction when available (set SSDOFFLOAD_CRC32C_SOFTWARE=1\n"
"before import to force the slicing-by-8 software implementation).");

PyObject* module_crc32c(PyObject* /*module*/, PyObject* args, PyObject* kwds) {
    static const char* kwlist[] = {"address", "nbytes", nullptr};
    PyObject* address_obj;
    PyObject* nbytes_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:crc32c", const_cast<char**>(kwlist),
                                     &address_obj, &nbytes_obj))
        return nullptr;
    uintptr_t address;
    long long nbytes;
    if (!as_address(address_obj, &address)) return nullptr;
    if (!as_long_long(nbytes_obj, "nbytes", &nbytes)) return nullptr;
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %lld", nbytes);
        return nullptr;
    }
    if (nbytes > 0 && address == 0) {
        PyErr_SetString(PyExc_ValueError, "address must not be 0 (NULL) when nbytes > 0");
        return nullptr;
    }
    const unsigned char* p = reinterpret_cast<const unsigned char*>(address);
    const size_t n = static_cast<size_t>(nbytes);
    uint32_t crc;
    if (n >= (256u << 10)) {
        Py_BEGIN_ALLOW_THREADS
        crc = crc32c_compute(p, n);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc32c_compute(p, n);
    }
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(copy_doc,
"copy(dst, src, nbytes)\n--\n\n"
"Blocks (GIL released): copies `nbytes` bytes of this process's memory from the\n"
"integer address `src` to `dst` through the kernel, so a source another thread\n"
"freed and unmapped meanwhile raises OSError(EFAULT) instead of crashing the\n"
"process.  `dst` must be valid memory of at least `nbytes`.");

PyObject* module_copy(PyObject* /*module*/, PyObject* args, PyObject* kwds) {
    static const char* kwlist[] = {"dst", "src", "nbytes", nullptr};
    PyObject* dst_obj;
    PyObject* src_obj;
    PyObject* nbytes_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:copy", const_cast<char**>(kwlist),
                                     &dst_obj, &src_obj, &nbytes_obj))
        return nullptr;
    uintptr_t dst, src;
    long long nbytes;
    if (!as_address(dst_obj, &dst) || !as_address(src_obj, &src)) return nullptr;
    if (!as_long_long(nbytes_obj, "nbytes", &nbytes)) return nullptr;
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %lld", nbytes);
        return nullptr;
    }
    if (nbytes > 0 && (dst == 0 || src == 0)) {
        PyErr_SetString(PyExc_ValueError, "addresses must not be 0 (NULL) when nbytes > 0");
        return nullptr;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = copy_from_own_memory(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                              static_cast<size_t>(nbytes));
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------
// Crash diagnostics: the native stack of a thread that dies of a signal.
// Python's faulthandler prints only Python frames; a crash inside this engine,
// torch or gloo then says nothing about where.  install_crash_handler() puts a
// handler in front of whatever is installed (faulthandler's): it writes the
// native backtrace of the crashing thread to stderr, puts the previous handler
// back and returns, so the faulting instruction runs again and the previous
// handler (faulthandler: every thread's Python stack) and then the default
// action (death by the signal, a core) follow as before.  backtrace() is
// called once at install so that libgcc is loaded then, not in the handler.
// ---------------------------------------------------------------------------
}  // namespace
#include <execinfo.h>
namespace {

const int kCrashSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
struct sigaction g_previous[sizeof(kCrashSignals) / sizeof(kCrashSignals[0])];
std::atomic<bool> g_crash_handler_installed{false};

void write_str(const char* text) {
    ssize_t ignored = write(2, text, strlen(text));
    (void)ignored;
}

void crash_handler(int sig) {
    write_str("\nssdoffload: fatal signal ");
    write_str(sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : sig == SIGFPE ? "SIGFPE"
              : sig == SIGILL ? "SIGILL" : "SIGABRT");
    write_str("; native stack of the crashing thread:\n");
    void* frames[64];
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, 2);
    for (size_t i = 0; i < sizeof(kCrashSignals) / sizeof(kCrashSignals[0]); ++i) {
        if (kCrashSignals[i] == sig) sigaction(sig, &g_previous[i], nullptr);
    }
    if (sig == SIGABRT) raise(sig);  // not re-executed by returning: raise it again
}

PyObject* module_install_crash_handler(PyObject*, PyObject*) {
    if (g_crash_handler_installed.exchange(true)) Py_RETURN_FALSE;
    void* warm[4];
    backtrace(warm, 4);
    for (size_t i = 0; i < sizeof(kCrashSignals) / sizeof(kCrashSignals[0]); ++i) {
        struct sigaction act;
        memset(&act, 0, sizeof(act));
        act.sa_handler = crash_handler;
        sigemptyset(&act.sa_mask);
        act.sa_flags = SA_NODEFER | SA_ONSTACK;
        if (sigaction(kCrashSignals[i], &act, &g_previous[i]) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(install_crash_handler_doc,
"install_crash_handler() -> bool\n\n"
"On SIGSEGV, SIGBUS, SIGFPE, SIGILL or SIGABRT, write the native stack of the crashing\n"
"thread to stderr, then hand the signal to the handler installed before (Python's\n"
"faulthandler prints every thread's Python stack) and the default action.  Install\n"
"faulthandler first.  Returns False if it was already installed.");

PyMethodDef module_methods[] = {
    {"install_crash_handler", module_install_crash_handler, METH_NOARGS, install_crash_handler_doc},
    {"crc32c", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(module_crc32c)),
     METH_VARARGS | METH_KEYWORDS, crc32c_doc},
    {"copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(module_copy)),
     METH_VARARGS | METH_KEYWORDS, copy_doc},
    {nullptr, nullptr, 0, nullptr},
};

PyDoc_STRVAR(module_doc,
"Native I/O engine of ssdoffload: a GIL-free worker pool doing aligned\n"
"(O_DIRECT-capable) pwrite/pread of host memory, addressed by raw integer\n"
"pointers, into preallocated spill files given as file descriptors.\n"
"\n"
"ALIGNMENT (4096) is the alignment required for file offsets, and used for\n"
"memory addresses and lengths of O_DIRECT I/O.");

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "ssdoffload.io._native",
    module_doc,
    -1,
    module_methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
    refresh_pid();
    static bool fork_handler = false;  // once per process, however often the module is loaded
    if (!fork_handler) {
        if (pthread_atfork(nullptr, nullptr, refresh_pid) != 0) return PyErr_NoMemory();
        fork_handler = true;
    }
    {
        // Chaos mode: read once, before any Engine exists (a second load of the module in
        // this process reads the same environment variable).
        const char* chaos = std::getenv("SSDOFFLOAD_CHAOS");
        if (chaos != nullptr && chaos[0] != '\0') {
            char* end = nullptr;
            errno = 0;
            unsigned long long seed = std::strtoull(chaos, &end, 10);
            if (errno != 0 || end == chaos || *end != '\0' || chaos[0] == '-') {
                PyErr_Format(PyExc_ValueError,
                             "SSDOFFLOAD_CHAOS must be a non-negative integer seed (or unset/empty: "
                             "off), got '%s'", chaos);
                return nullptr;
            }
            g_chaos_seed = static_cast<uint64_t>(seed);
            g_chaos = true;
        }
    }
    crc32c_init_tables();
    crc32c_init_shift(&g_shift_long, kCrcLong);
    crc32c_init_shift(&g_shift_short, kCrcShort);
#ifdef SSDOFFLOAD_HAVE_X86_CRC
    {
        const char* force_sw = std::getenv("SSDOFFLOAD_CRC32C_SOFTWARE");
        bool sw = force_sw != nullptr && force_sw[0] != '\0' && std::strcmp(force_sw, "0") != 0;
        __builtin_cpu_init();
        g_crc_use_hw = !sw && __builtin_cpu_supports("sse4.2");
    }
#endif

    PyObject* m = PyModule_Create(&module_def);
    if (m == nullptr) return nullptr;

    if (g_request_type == nullptr) {
        g_request_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&request_spec));
        if (g_request_type == nullptr) goto fail;
#ifndef Py_TPFLAGS_DISALLOW_INSTANTIATION
        g_request_type->tp_new = nullptr;
#endif
    }
    if (g_engine_type == nullptr) {
        g_engine_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&engine_spec));
        if (g_engine_type == nullptr) goto fail;
    }
    Py_INCREF(g_engine_type);
    if (PyModule_AddObject(m, "Engine", reinterpret_cast<PyObject*>(g_engine_type)) < 0) {
        Py_DECREF(g_engine_type);
        goto fail;
    }
    Py_INCREF(g_request_type);
    if (PyModule_AddObject(m, "Request", reinterpret_cast<PyObject*>(g_request_type)) < 0) {
        Py_DECREF(g_request_type);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "ALIGNMENT", static_cast<long>(kAlign)) < 0) goto fail;
    {
        // CHAOS_SEED: the seed of chaos mode, or None when it is off.
        PyObject* seed = g_chaos ? PyLong_FromUnsignedLongLong(g_chaos_seed) : Py_NewRef(Py_None);
        if (seed == nullptr || PyModule_AddObject(m, "CHAOS_SEED", seed) < 0) {
            Py_XDECREF(seed);
            goto fail;
        }
    }
    if (PyModule_AddStringConstant(m, "CRC32C_IMPLEMENTATION",
                                   g_crc_use_hw ? "sse4.2" : "slicing-by-8") < 0)
        goto fail;
    return m;

fail:
    Py_DECREF(m);
    return nullptr;
}
