// host_runtime.h: CUDA's execution model on the CPU, with checks.
//
// The host build (cupydcn/_kernels.py, HostBackend) compiles
//     host_runtime.h + host_shim.h + common.cuh + <kernel file> + launch wrappers
// as one C++ translation unit. This header is the executor:
//
// * Grid and block are 1-, 2- or 3-D. Blocks run in parallel on a pool of
//   `workers` OS threads (blocks taken from a shared counter, in a seeded
//   random order when `vary` is set); a block runs start to finish on one
//   worker.
// * A kernel that uses no block cooperation (the launch says `cooperative=0`)
//   runs each block's threads as a plain loop: no contexts, nothing to switch.
// * A cooperative kernel runs each thread of a block as its own fiber (its
//   own stack; on x86-64 a switch is a few instructions that save the
//   callee-saved registers, with no system call; elsewhere, or with
//   DCN_HOST_UCONTEXT defined, POSIX ucontext). A fiber runs until it blocks
//   (block barrier, warp operation) or ends. The scheduler sweeps the block's
//   threads, running each runnable one until it blocks; after a sweep it
//   completes the warp operations whose member lanes have all arrived, then
//   the block barrier if every live thread waits at it, and reports a
//   deadlock (a divergent __syncthreads, a lane of a mask that exited) as an
//   error. With `vary` each sweep visits the threads in a fresh seeded random
//   order.
// * Shared memory (static, through DCN_SHARED, and dynamic, through
//   DCN_SHARED_DYNAMIC, see common.cuh) is one allocation per block, filled
//   with 0xFF bytes at block start (a NaN in every float type). Kernels reach
//   it through dcn_shared_array<T>, whose subscript records, with `checks`,
//   every element access (thread, barrier epoch, read or write, file:line of
//   the subscript): a write and another thread's read or write of the same
//   byte between two barriers is reported as a race.
// * cp.async copies (common.cuh) are queued per thread and land only at the
//   cp.async.wait_group that covers them.
// * Global atomics are real atomics (the __atomic built-ins).
//
// An error (race, divergent barrier, bad mask, ...) stops the launch; the
// launch wrapper returns 1 and dcn_host_error() gives the report, which the
// loader raises as RuntimeError.
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

// ---------------------------------------------------------------- execution contexts
//
// dcn_host_context_make(c, stack, size, entry, arg): c, when switched to, runs
// entry(arg) on the stack (entry never returns: a fiber ends by switching
// away for good). dcn_host_context_switch(from, to) saves the running context
// in `from` and resumes `to`.
#if defined(__x86_64__) && !defined(DCN_HOST_UCONTEXT)
// The System V x86-64 ABI: a call preserves rbx, rbp, r12-r15, the stack
// pointer and the control words of MXCSR and the x87 unit; the switch saves
// exactly those on the old stack and restores them from the new one. A fresh
// context's stack holds what dcn_host_context_start needs: r12 = arg,
// r13 = entry.
struct dcn_host_context { void* sp; };
extern "C" void dcn_host_context_swap(void** save, void* resume);
extern "C" void dcn_host_context_start();
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl dcn_host_context_swap\n"
    ".hidden dcn_host_context_swap\n"
    ".type dcn_host_context_swap, @function\n"
    "dcn_host_context_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size dcn_host_context_swap, .-dcn_host_context_swap\n"
    ".p2align 4\n"
    ".globl dcn_host_context_start\n"
    ".hidden dcn_host_context_start\n"
    ".type dcn_host_context_start, @function\n"
    "dcn_host_context_start:\n"  // rsp is 16-byte aligned here, as the call below needs
    "  movq %r12, %rdi\n  callq *%r13\n  ud2\n"
    ".size dcn_host_context_start, .-dcn_host_context_start\n");

static void dcn_host_context_make(dcn_host_context* c, char* stack, std::size_t size,
                                  void (*entry)(void*), void* arg) {
  const std::uintptr_t top = (std::uintptr_t)(stack + size) & ~(std::uintptr_t)15;
  std::uint64_t* sp = reinterpret_cast<std::uint64_t*>(top) - 8;  // sp + 8 words = top
  std::uint32_t control[2];  // the creating thread's MXCSR and x87 control word
  __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  std::memcpy(&sp[0], control, sizeof control);
  sp[1] = 0;                                                        // r15
  sp[2] = 0;                                                        // r14
  sp[3] = (std::uint64_t)(std::uintptr_t)entry;                     // r13
  sp[4] = (std::uint64_t)(std::uintptr_t)arg;                       // r12
  sp[5] = 0;                                                        // rbx
  sp[6] = 0;                                                        // rbp
  sp[7] = (std::uint64_t)(std::uintptr_t)&dcn_host_context_start;   // ret: rsp = top
  c->sp = sp;
}

static inline void dcn_host_context_switch(dcn_host_context* from, dcn_host_context* to) {
  dcn_host_context_swap(&from->sp, to->sp);
}
#else
struct dcn_host_context { ucontext_t uc; };

static void dcn_host_context_trampoline(unsigned int f0, unsigned int f1, unsigned int a0,
                                        unsigned int a1) {
  auto entry = reinterpret_cast<void (*)(void*)>((std::uintptr_t)f0 | ((std::uintptr_t)f1 << 32));
  entry(reinterpret_cast<void*>((std::uintptr_t)a0 | ((std::uintptr_t)a1 << 32)));
  std::abort();  // a fiber never returns
}

static void dcn_host_context_make(dcn_host_context* c, char* stack, std::size_t size,
                                  void (*entry)(void*), void* arg) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  const std::uintptr_t f = (std::uintptr_t)entry, a = (std::uintptr_t)arg;
  makecontext(&c->uc, (void (*)())dcn_host_context_trampoline, 4, (unsigned int)(f & 0xffffffffu),
              (unsigned int)(f >> 32), (unsigned int)(a & 0xffffffffu), (unsigned int)(a >> 32));
}

static inline void dcn_host_context_switch(dcn_host_context* from, dcn_host_context* to) {
  swapcontext(&from->uc, &to->uc);
}
#endif

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

// The launch configuration, as the loader passes it (a ctypes Structure).
struct dcn_host_config {
  unsigned int grid[3];
  unsigned int block[3];
  unsigned long long shared_bytes;  // dynamic shared memory per block
  unsigned long long seed;
  int workers;
  int checks;       // race detection, bounds of shared arrays, mask checks
  int vary;         // seeded order of blocks and threads
  int cooperative;  // 1: one fiber per thread; 0: a plain loop
};

static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;

struct dcn_host_abort {};  // unwinds a plain-loop thread that failed

struct dcn_host_launch_state;
struct dcn_host_block;

// ---------------------------------------------------------------- errors

static thread_local std::string dcn_host_error_text;  // of the last launch of this OS thread

extern "C" const char* dcn_host_error() { return dcn_host_error_text.c_str(); }

struct dcn_host_thread;

struct dcn_host_access {  // one recorded access of a shared byte
  bool valid;
  unsigned int tid, epoch, wgen;  // thread, block barriers and warp syncs before it
  const char* file; int line;
};

struct dcn_host_shadow {  // race-detection state of one shared byte
  dcn_host_access write, read[2];  // the last write; up to two readers since
};

struct dcn_host_alloc {  // one shared-memory allocation of a block
  const void* site;  // the declaring DCN_SHARED's static marker; null for dynamic
  const char* name;
  std::size_t bytes;
  std::vector<unsigned char> data;
  std::vector<dcn_host_shadow> shadow;
};

struct dcn_host_copy {  // one queued cp.async
  unsigned char* dst;
  dcn_host_alloc* alloc;
  std::size_t offset;
  unsigned char bytes[16];
  int size;
  const char* file; int line;
};

enum dcn_host_state { DCN_RUNNABLE, DCN_AT_BARRIER, DCN_AT_WARP, DCN_DONE };

typedef void (*dcn_host_warp_fn)(dcn_host_block* block, unsigned int warp, unsigned int mask);

struct dcn_host_thread {
  dcn_host_context context;
  unsigned int tid;  // linear index in the block
  uint3 idx;
  dcn_host_state state;
  int kind;  // of the block barrier waited at: 1 plain, 2 count, 3 and, 4 or
  // the operation the thread waits at
  const char* file; int line;
  int predicate;
  int result;
  unsigned int mask;
  dcn_host_warp_fn op;
  const char* op_name;
  alignas(16) unsigned char in[80];
  alignas(16) unsigned char out[80];
  // cp.async
  std::vector<dcn_host_copy> copies;  // issued, oldest first
  std::vector<std::size_t> group_ends;  // committed group boundaries in `copies`
};

struct dcn_host_launch_state {
  const dcn_host_config* config;
  const char* kernel;
  std::atomic<bool> failed{false};
  std::mutex error_lock;
  std::string error;
  std::atomic<unsigned long long> next_block{0};
  std::vector<unsigned long long> order;  // block visiting order
  unsigned long long workers;
  unsigned long long chunk;  // blocks a worker takes at a time: neighbours stay on one core
};

struct dcn_host_block {
  dcn_host_launch_state* launch;
  uint3 idx;
  unsigned int nthreads;
  std::vector<dcn_host_thread> threads;
  std::vector<unsigned int> order;      // the scheduler's sweep order
  std::vector<dcn_host_alloc*> allocs;  // static allocations in use
  std::vector<dcn_host_alloc*> spare;   // reused across blocks
  dcn_host_alloc dynamic;
  unsigned int epoch;                   // completed block barriers
  std::vector<unsigned int> warp_gen;   // completed __syncwarp per warp
  dcn_host_thread* current;             // the running fiber, or null (plain loop)
  dcn_host_context scheduler;
  char* stacks;  // fiber stacks, allocated once per worker (malloc: untouched pages stay free)
  std::size_t stack_count;
  std::size_t stack_size;
  unsigned long long rng;
  bool failed;
};

static thread_local dcn_host_block* dcn_host_cur = nullptr;
// False while a launch runs on one OS thread: global atomics are then plain
// read-modify-writes (nothing else runs), which keeps the serial path fast.
static thread_local bool dcn_host_atomic = true;

static unsigned long long dcn_host_next_random(unsigned long long* state) {
  unsigned long long z = (*state += 0x9E3779B97F4A7C15ull);  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static std::string dcn_host_where(dcn_host_block* b) {
  char text[256];
  std::snprintf(text, sizeof text, "kernel %s, block (%u, %u, %u)", b->launch->kernel, b->idx.x,
                b->idx.y, b->idx.z);
  return text;
}

static std::string dcn_host_thread_name(dcn_host_block*, unsigned int tid) {
  char text[128];
  std::snprintf(text, sizeof text, "thread (%u, %u, %u) [warp %u lane %u]", tid % blockDim.x,
                tid / blockDim.x % blockDim.y, tid / (blockDim.x * blockDim.y), tid / 32, tid % 32);
  return text;
}

// Stops the launch with `message` (the first error of a launch is kept). In a
// fiber it switches back to the scheduler for good; in a plain loop it throws.
[[noreturn]] static void dcn_host_fail(const std::string& message) {
  dcn_host_block* b = dcn_host_cur;
  {
    std::lock_guard<std::mutex> guard(b->launch->error_lock);
    if (!b->launch->failed.exchange(true)) b->launch->error = message;
  }
  if (b->current != nullptr) {  // in a fiber: back to the scheduler, never resumed
    b->failed = true;
    dcn_host_thread* self = b->current;
    dcn_host_context_switch(&self->context, &b->scheduler);
  }
  throw dcn_host_abort();
}

static dcn_host_block* dcn_host_need_cooperative(const char* what, const char* file, int line) {
  dcn_host_block* b = dcn_host_cur;
  if (b == nullptr || b->current == nullptr) {
    char text[512];
    std::snprintf(text, sizeof text,
                  "%s at %s:%d in a kernel launched without cooperative=True (a plain loop "
                  "over threads): launch it cooperatively", what, file, line);
    dcn_host_fail(dcn_host_where(b) + ": " + text);
  }
  return b;
}

// ---------------------------------------------------------------- shared memory

static void dcn_host_reset_alloc(dcn_host_alloc* a, std::size_t bytes, bool checks) {
  a->bytes = bytes;
  a->data.assign(bytes + 16, 0xFF);  // 0xFF..: NaN in every float type
  if (checks) a->shadow.assign(bytes, dcn_host_shadow());
}

static void dcn_host_race(dcn_host_block* b, dcn_host_alloc* a, std::size_t offset, std::size_t at,
                          const char* kind, unsigned int other, const char* ofile, int oline,
                          unsigned int tid, const char* file, int line) {
  char text[1024];
  std::snprintf(text, sizeof text,
                "shared-memory race (%s) in %s: %s at %s:%d and %s at %s:%d access byte %zu "
                "(of this access) at offset %zu of shared array '%s' with no barrier between "
                "them", kind, dcn_host_where(b).c_str(), dcn_host_thread_name(b, other).c_str(),
                ofile, oline, dcn_host_thread_name(b, tid).c_str(), file, line, offset, at,
                a->name);
  dcn_host_fail(text);
}

// Records an access of `size` bytes at `offset` of `a` by thread `tid`.
static void dcn_host_record(dcn_host_block* b, dcn_host_alloc* a, std::size_t offset,
                            std::size_t size, bool write, unsigned int tid, const char* file,
                            int line) {
  if (!b->launch->config->checks) return;
  const unsigned int epoch = b->epoch, warp = tid / 32;
  const unsigned int wgen = b->warp_gen[warp];
  auto ordered = [&](unsigned int other, unsigned int e, unsigned int g) {
    return other == tid || e != epoch || (other / 32 == warp && g != wgen);
  };
  const dcn_host_access me{true, tid, epoch, wgen, file, line};
  for (std::size_t k = offset; k < offset + size; ++k) {
    dcn_host_shadow& s = a->shadow[k];
    if (s.write.valid && !ordered(s.write.tid, s.write.epoch, s.write.wgen))
      dcn_host_race(b, a, k - offset, k, write ? "write after write" : "read after write",
                    s.write.tid, s.write.file, s.write.line, tid, file, line);
    if (write) {
      for (const dcn_host_access& r : s.read)
        if (r.valid && !ordered(r.tid, r.epoch, r.wgen))
          dcn_host_race(b, a, k - offset, k, "write after read", r.tid, r.file, r.line, tid, file,
                        line);
      s.write = me;
    } else if (!s.read[0].valid || s.read[0].epoch != epoch || s.read[0].tid == tid) {
      if (s.read[0].epoch != epoch) s.read[1].valid = false;
      s.read[0] = me;
    } else {
      s.read[1] = me;  // a second reader in this epoch: a later write by either races
    }
  }
}

// The shared allocation of the declaration `site` in the current block.
static dcn_host_alloc* dcn_host_shared_alloc(const void* site, const char* name, std::size_t bytes,
                                             const char* file, int line) {
  dcn_host_block* b = dcn_host_need_cooperative("shared memory", file, line);
  for (dcn_host_alloc* a : b->allocs)
    if (a->site == site) return a;
  dcn_host_alloc* a;
  if (b->spare.empty()) {
    a = new dcn_host_alloc();
  } else {
    a = b->spare.back();
    b->spare.pop_back();
  }
  a->site = site;
  a->name = name;
  dcn_host_reset_alloc(a, bytes, b->launch->config->checks);
  b->allocs.push_back(a);
  return a;
}

// A subscript's index with the file and line of the subscript expression.
struct dcn_host_index {
  long long i;
  const char* file;
  int line;
  template <typename N, typename = typename std::enable_if<std::is_integral<N>::value>::type>
  dcn_host_index(N n, const char* f = __builtin_FILE(), int l = __builtin_LINE())
      : i((long long)n), file(f), line(l) {}
};

template <typename T> struct dcn_shared_array;

template <typename T> struct dcn_shared_ref {  // one element: reads and writes are recorded
  dcn_host_alloc* alloc;
  std::size_t offset;  // bytes
  const char* file; int line;
  T* ptr() const { return reinterpret_cast<T*>(alloc->data.data() + offset); }
  void record(bool write) const {
    dcn_host_block* b = dcn_host_cur;
    dcn_host_record(b, alloc, offset, sizeof(T), write, b->current->tid, file, line);
  }
  operator T() const { record(false); T v; std::memcpy(&v, ptr(), sizeof v); return v; }
  const dcn_shared_ref& operator=(const T& v) const {
    record(true); std::memcpy(ptr(), &v, sizeof v); return *this;
  }
  const dcn_shared_ref& operator=(const dcn_shared_ref& o) const { return *this = (T)o; }
  template <typename V> const dcn_shared_ref& operator+=(const V& v) const { return *this = (T)(T(*this) + v); }
  template <typename V> const dcn_shared_ref& operator-=(const V& v) const { return *this = (T)(T(*this) - v); }
  template <typename V> const dcn_shared_ref& operator*=(const V& v) const { return *this = (T)(T(*this) * v); }
  dcn_shared_array<T> operator&() const;
};

// A shared array (or a pointer into one) as kernels see it on the host.
template <typename T> struct dcn_shared_array {
  dcn_host_alloc* alloc;
  std::size_t base;  // bytes from the allocation's start
  dcn_shared_ref<T> operator[](dcn_host_index i) const {
    const long long count = (long long)((alloc->bytes - base) / sizeof(T));
    if (i.i < 0 || i.i >= count) {
      char text[512];
      std::snprintf(text, sizeof text,
                    "%s: %s indexes shared array '%s' at %lld, outside [0, %lld), at %s:%d",
                    dcn_host_where(dcn_host_cur).c_str(),
                    dcn_host_thread_name(dcn_host_cur, dcn_host_cur->current->tid).c_str(),
                    alloc->name, i.i, count, i.file, i.line);
      dcn_host_fail(text);
    }
    return {alloc, base + (std::size_t)i.i * sizeof(T), i.file, i.line};
  }
  dcn_shared_array operator+(long long n) const { return {alloc, base + n * sizeof(T)}; }
  // the byte range [offset, offset + size) of element i, bounds-checked
  std::size_t bytes_at(const dcn_host_index& i, std::size_t size) const {
    const std::size_t offset = base + (std::size_t)i.i * sizeof(T);
    if (i.i < 0 || offset + size > alloc->bytes) {
      char text[512];
      std::snprintf(text, sizeof text,
                    "%s: an access of %zu bytes at element %lld of shared array '%s' "
                    "leaves it (%zu bytes), at %s:%d",
                    dcn_host_where(dcn_host_cur).c_str(), size, i.i, alloc->name, alloc->bytes,
                    i.file, i.line);
      dcn_host_fail(text);
    }
    return offset;
  }
};

template <typename T> dcn_shared_array<T> dcn_shared_ref<T>::operator&() const {
  return {alloc, offset};
}

template <typename T>
static dcn_shared_array<T> dcn_host_shared_static(const void* site, const char* name,
                                                  std::size_t count, const char* file, int line) {
  return {dcn_host_shared_alloc(site, name, count * sizeof(T), file, line), 0};
}

template <typename T>
static dcn_shared_array<T> dcn_host_shared_dynamic(const char* file, int line) {
  dcn_host_block* b = dcn_host_need_cooperative("dynamic shared memory", file, line);
  return {&b->dynamic, 0};
}

// ---------------------------------------------------------------- fibers

static void dcn_host_yield(dcn_host_block* b) {
  dcn_host_thread* self = b->current;
  dcn_host_context_switch(&self->context, &b->scheduler);
}

static std::string dcn_host_thread_states(dcn_host_block* b) {
  std::string out;
  int shown = 0;
  for (dcn_host_thread& t : b->threads) {
    if (shown == 8) { out += "\n  ..."; break; }
    char text[384];
    if (t.state == DCN_AT_BARRIER) {
      std::snprintf(text, sizeof text, "\n  %s waits at __syncthreads at %s:%d",
                    dcn_host_thread_name(b, t.tid).c_str(), t.file, t.line);
    } else if (t.state == DCN_AT_WARP) {
      std::snprintf(text, sizeof text, "\n  %s waits at %s(mask 0x%08x) at %s:%d",
                    dcn_host_thread_name(b, t.tid).c_str(), t.op_name, t.mask, t.file, t.line);
    } else {
      continue;
    }
    out += text;
    ++shown;
  }
  return out;
}

// Completes the warp operations whose lanes have all arrived; true if any did.
static bool dcn_host_complete_warps(dcn_host_block* b) {
  bool progress = false;
  const bool checks = b->launch->config->checks;
  for (dcn_host_thread& t : b->threads) {
    if (t.state != DCN_AT_WARP) continue;
    const unsigned int warp = t.tid / 32;
    bool ready = true;
    for (unsigned int lane = 0; lane < 32 && ready; ++lane) {
      if (!(t.mask >> lane & 1u)) continue;
      const unsigned int other = warp * 32 + lane;
      if (other >= b->nthreads) {
        char text[512];
        std::snprintf(text, sizeof text,
                      "%s: %s calls %s with mask 0x%08x at %s:%d, but lane %u does not exist "
                      "(the block has %u threads)", dcn_host_where(b).c_str(),
                      dcn_host_thread_name(b, t.tid).c_str(), t.op_name, t.mask, t.file, t.line,
                      lane, b->nthreads);
        dcn_host_fail(text);
      }
      dcn_host_thread& o = b->threads[other];
      if (o.state == DCN_DONE) {
        char text[512];
        std::snprintf(text, sizeof text,
                      "%s: %s calls %s with mask 0x%08x at %s:%d, but lane %u of the mask has "
                      "exited", dcn_host_where(b).c_str(), dcn_host_thread_name(b, t.tid).c_str(),
                      t.op_name, t.mask, t.file, t.line, lane);
        dcn_host_fail(text);
      }
      if (o.state != DCN_AT_WARP) { ready = false; break; }
      if (checks && (o.mask != t.mask || o.op != t.op)) {
        char text[768];
        std::snprintf(text, sizeof text,
                      "%s: lanes of one warp disagree: %s calls %s(mask 0x%08x) at %s:%d while "
                      "%s calls %s(mask 0x%08x) at %s:%d", dcn_host_where(b).c_str(),
                      dcn_host_thread_name(b, t.tid).c_str(), t.op_name, t.mask, t.file, t.line,
                      dcn_host_thread_name(b, o.tid).c_str(), o.op_name, o.mask, o.file, o.line);
        dcn_host_fail(text);
      }
    }
    if (!ready) continue;
    t.op(b, warp, t.mask);
    for (unsigned int lane = 0; lane < 32; ++lane)
      if (t.mask >> lane & 1u) b->threads[warp * 32 + lane].state = DCN_RUNNABLE;
    progress = true;
  }
  return progress;
}

// Completes the block barrier if every live thread waits at it.
static bool dcn_host_complete_barrier(dcn_host_block* b) {
  dcn_host_thread* first = nullptr;
  int count = 0, all = 1, any = 0;
  for (dcn_host_thread& t : b->threads) {
    if (t.state == DCN_AT_BARRIER) {
      if (first == nullptr) first = &t;
      if (first->line != t.line || std::strcmp(first->file, t.file) != 0) {
        char text[1024];
        std::snprintf(text, sizeof text,
                      "%s: divergent __syncthreads: %s waits at %s:%d while %s waits at %s:%d",
                      dcn_host_where(b).c_str(), dcn_host_thread_name(b, first->tid).c_str(),
                      first->file, first->line, dcn_host_thread_name(b, t.tid).c_str(), t.file,
                      t.line);
        dcn_host_fail(text);
      }
      count += t.predicate;
      all &= t.predicate;
      any |= t.predicate;
    } else if (t.state != DCN_DONE) {
      return false;
    }
  }
  if (first == nullptr) return false;
  for (dcn_host_thread& t : b->threads) {
    if (t.state == DCN_DONE) {
      char text[1024];
      std::snprintf(text, sizeof text,
                    "%s: divergent __syncthreads: %s waits at %s:%d but %s has exited without "
                    "reaching it (a barrier under a branch not taken by the whole block)",
                    dcn_host_where(b).c_str(), dcn_host_thread_name(b, first->tid).c_str(),
                    first->file, first->line, dcn_host_thread_name(b, t.tid).c_str());
      dcn_host_fail(text);
    }
  }
  ++b->epoch;
  for (dcn_host_thread& t : b->threads) {
    t.result = t.kind == 2 ? count : t.kind == 3 ? all : t.kind == 4 ? any : 0;
    t.state = DCN_RUNNABLE;
  }
  return true;
}

template <typename Kernel> struct dcn_host_entry_args {
  dcn_host_block* block;
  Kernel* kernel;
};

template <typename Kernel> static void dcn_host_fiber_main(void* address) {
  auto* args = static_cast<dcn_host_entry_args<Kernel>*>(address);
  dcn_host_block* b = args->block;
  (*args->kernel)();
  dcn_host_thread* self = b->current;
  self->state = DCN_DONE;
  dcn_host_context_switch(&self->context, &b->scheduler);  // never resumed
  std::abort();
}

static void dcn_host_drain_copies(dcn_host_block* b, dcn_host_thread& t, std::size_t keep_groups);

// Runs one block of a cooperative kernel: one fiber per thread.
template <typename Kernel> static void dcn_host_run_fibers(dcn_host_block* b, Kernel& kernel) {
  const dcn_host_config* cfg = b->launch->config;
  const std::size_t n = b->nthreads;
  b->threads.resize(n);
  if (b->stack_count < n) {
    std::free(b->stacks);
    b->stacks = static_cast<char*>(std::malloc(n * b->stack_size));
    if (b->stacks == nullptr) dcn_host_fail(dcn_host_where(b) + ": out of memory for fiber stacks");
    b->stack_count = n;
  }
  dcn_host_entry_args<Kernel> args{b, &kernel};
  for (std::size_t i = 0; i < n; ++i) {
    dcn_host_thread& t = b->threads[i];
    t.tid = (unsigned int)i;
    t.idx = uint3(i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y));
    t.state = DCN_RUNNABLE;
    t.copies.clear();
    t.group_ends.clear();
    dcn_host_context_make(&t.context, b->stacks + i * b->stack_size, b->stack_size,
                          dcn_host_fiber_main<Kernel>, &args);
  }
  // Sweeps: each runs every runnable thread until it blocks (in a fresh random
  // order with vary); between sweeps the warp operations and the block barrier
  // whose threads have all arrived complete.
  std::vector<unsigned int>& order = b->order;
  order.resize(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = (unsigned int)i;
  while (!b->failed && !b->launch->failed.load(std::memory_order_relaxed)) {
    if (cfg->vary) {
      for (std::size_t i = n; i > 1; --i)
        std::swap(order[i - 1], order[dcn_host_next_random(&b->rng) % i]);
    }
    bool ran = false;
    for (std::size_t k = 0; k < n && !b->failed; ++k) {
      dcn_host_thread& t = b->threads[order[k]];
      if (t.state != DCN_RUNNABLE) continue;
      ran = true;
      threadIdx = t.idx;
      b->current = &t;
      dcn_host_context_switch(&b->scheduler, &t.context);
      b->current = nullptr;
      if (t.state == DCN_DONE && !t.copies.empty()) dcn_host_drain_copies(b, t, 0);
    }
    if (ran || b->failed) continue;
    if (dcn_host_complete_warps(b)) continue;
    if (dcn_host_complete_barrier(b)) continue;
    bool done = true;
    for (dcn_host_thread& t : b->threads) done &= t.state == DCN_DONE;
    if (done) break;
    dcn_host_fail(dcn_host_where(b) + ": deadlock: no thread can run" +
                  dcn_host_thread_states(b));
  }
}

// ---------------------------------------------------------------- launch

template <typename Kernel>
static void dcn_host_run_block(dcn_host_block* b, unsigned long long linear, Kernel& kernel) {
  const dcn_host_config* cfg = b->launch->config;
  b->idx = uint3(linear % cfg->grid[0], linear / cfg->grid[0] % cfg->grid[1],
                 linear / ((unsigned long long)cfg->grid[0] * cfg->grid[1]));
  blockIdx = b->idx;
  if (!cfg->cooperative) {
    // a plain loop over the threads (a seeded rotation and direction with vary)
    const unsigned int n = b->nthreads;
    unsigned int start = 0, step = 1;
    if (cfg->vary) {
      start = (unsigned int)(dcn_host_next_random(&b->rng) % n);
      step = (dcn_host_next_random(&b->rng) & 1u) ? 1 : n - 1;
    }
    for (unsigned int k = 0, i = start; k < n; ++k, i = (i + step) % n) {
      threadIdx = uint3(i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y));
      kernel();
    }
    return;
  }
  for (dcn_host_alloc* a : b->allocs) b->spare.push_back(a);
  b->allocs.clear();
  dcn_host_reset_alloc(&b->dynamic, cfg->shared_bytes, cfg->checks);
  b->epoch = 0;
  b->warp_gen.assign((b->nthreads + 31) / 32, 0);
  dcn_host_run_fibers(b, kernel);
}

template <typename Kernel>
static void dcn_host_worker(dcn_host_launch_state* launch, Kernel kernel, unsigned int index) {
  const dcn_host_config* cfg = launch->config;
  gridDim = dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]);
  blockDim = dim3(cfg->block[0], cfg->block[1], cfg->block[2]);
  dcn_host_block block;
  block.launch = launch;
  block.nthreads = cfg->block[0] * cfg->block[1] * cfg->block[2];
  block.dynamic.site = nullptr;
  block.dynamic.name = "extern __shared__ (dynamic)";
  block.current = nullptr;
  block.stack_size = 128 * 1024;
  block.stacks = nullptr;
  block.stack_count = 0;
  block.rng = cfg->seed * 0x2545F4914F6CDD1Dull + index + 1;
  block.failed = false;
  dcn_host_cur = &block;
  dcn_host_atomic = launch->workers > 1;
  const unsigned long long total = launch->order.size(), chunk = launch->chunk;
  try {
    for (;;) {
      if (launch->failed.load(std::memory_order_relaxed)) break;
      const unsigned long long first = launch->next_block.fetch_add(chunk);
      if (first >= total) break;
      const unsigned long long last = first + chunk < total ? first + chunk : total;
      for (unsigned long long k = first; k < last && !block.failed; ++k)
        dcn_host_run_block(&block, launch->order[k], kernel);
      if (block.failed) break;
    }
  } catch (const dcn_host_abort&) {
  }
  std::free(block.stacks);
  for (dcn_host_alloc* a : block.allocs) delete a;
  for (dcn_host_alloc* a : block.spare) delete a;
  dcn_host_cur = nullptr;
}

template <typename Kernel>
static int dcn_host_execute(const char* name, const dcn_host_config* cfg, Kernel kernel) {
  const unsigned long long nblocks =
      (unsigned long long)cfg->grid[0] * cfg->grid[1] * cfg->grid[2];
  const unsigned long long nthreads =
      (unsigned long long)cfg->block[0] * cfg->block[1] * cfg->block[2];
  dcn_host_error_text.clear();
  if (nblocks == 0 || nthreads == 0 || nthreads > 1024) {
    char text[256];
    std::snprintf(text, sizeof text,
                  "kernel %s: launch with grid (%u, %u, %u) and block (%u, %u, %u): the grid "
                  "needs at least one block and a block 1 to 1024 threads", name, cfg->grid[0],
                  cfg->grid[1], cfg->grid[2], cfg->block[0], cfg->block[1], cfg->block[2]);
    dcn_host_error_text = text;
    return 1;
  }
  dcn_host_launch_state launch;
  launch.config = cfg;
  launch.kernel = name;
  launch.order.resize(nblocks);
  for (unsigned long long i = 0; i < nblocks; ++i) launch.order[i] = i;
  if (cfg->vary) {
    unsigned long long state = cfg->seed ^ 0xD1B54A32D192ED03ull;
    for (unsigned long long i = nblocks; i > 1; --i)
      std::swap(launch.order[i - 1], launch.order[dcn_host_next_random(&state) % i]);
  }
  unsigned long long workers = cfg->workers > 0 ? (unsigned long long)cfg->workers : 1;
  if (workers > nblocks) workers = nblocks;
  launch.workers = workers;
  launch.chunk = cfg->vary ? 1 : (nblocks + 16 * workers - 1) / (16 * workers);
  if (workers == 1) {
    dcn_host_worker(&launch, kernel, 0);
  } else {
    std::vector<std::thread> pool;
    for (unsigned int w = 1; w < workers; ++w)
      pool.emplace_back(dcn_host_worker<Kernel>, &launch, kernel, w);
    dcn_host_worker(&launch, kernel, 0);
    for (std::thread& t : pool) t.join();
  }
  if (!launch.failed.load()) return 0;
  dcn_host_error_text = launch.error;
  return 1;
}

// Runs `kernel` with arguments given as an array of pointers to the values
// (cuLaunchKernel's convention).
template <typename... Args, std::size_t... K>
static int dcn_host_launch_impl(const char* name, void (*kernel)(Args...), void** args,
                                const dcn_host_config* cfg, std::index_sequence<K...>) {
  std::tuple<typename std::decay<Args>::type...> values(
      *static_cast<typename std::decay<Args>::type*>(args[K])...);
  auto body = [kernel, values]() { kernel(std::get<K>(values)...); };
  return dcn_host_execute(name, cfg, body);
}

template <typename... Args>
static int dcn_host_launch(const char* name, void (*kernel)(Args...), void** args,
                           const dcn_host_config* cfg) {
  return dcn_host_launch_impl(name, kernel, args, cfg, std::index_sequence_for<Args...>{});
}

// ---------------------------------------------------------------- barriers and warps

static int dcn_host_syncthreads(int kind, int predicate, const char* file, int line) {
  dcn_host_block* b = dcn_host_need_cooperative("__syncthreads", file, line);
  dcn_host_thread* self = b->current;
  self->state = DCN_AT_BARRIER;
  self->file = file;
  self->line = line;
  self->kind = kind;
  self->predicate = predicate != 0;
  dcn_host_yield(b);
  return self->result;
}

// Waits at a warp operation; `op` runs once, when every lane of `mask` is here.
static void dcn_host_warp_wait(dcn_host_warp_fn op, const char* op_name, unsigned int mask,
                               const char* file, int line) {
  dcn_host_block* b = dcn_host_need_cooperative(op_name, file, line);
  dcn_host_thread* self = b->current;
  const unsigned int lane = self->tid % 32;
  if (!(mask >> lane & 1u)) {
    char text[512];
    std::snprintf(text, sizeof text,
                  "%s: %s calls %s with mask 0x%08x at %s:%d, which does not include its own "
                  "lane %u", dcn_host_where(b).c_str(), dcn_host_thread_name(b, self->tid).c_str(),
                  op_name, mask, file, line, lane);
    dcn_host_fail(text);
  }
  self->state = DCN_AT_WARP;
  self->op = op;
  self->op_name = op_name;
  self->mask = mask;
  self->file = file;
  self->line = line;
  dcn_host_yield(b);
}

static void dcn_host_op_syncwarp(dcn_host_block* b, unsigned int warp, unsigned int) {
  ++b->warp_gen[warp];
}

template <typename T> static T dcn_host_shfl_result(dcn_host_block* b, unsigned int warp,
                                                    unsigned int mask, unsigned int lane,
                                                    unsigned int src) {
  dcn_host_thread& t = b->threads[warp * 32 + lane];
  if (!(mask >> src & 1u)) {
    char text[512];
    std::snprintf(text, sizeof text,
                  "%s: %s reads lane %u through %s(mask 0x%08x) at %s:%d, but that lane is not "
                  "in the mask (its value is undefined on the GPU)", dcn_host_where(b).c_str(),
                  dcn_host_thread_name(b, t.tid).c_str(), src, t.op_name, mask, t.file, t.line);
    dcn_host_fail(text);
  }
  T v;
  std::memcpy(&v, b->threads[warp * 32 + src].in, sizeof v);
  return v;
}

// in: [value (8 bytes)][int parameter][int width]
template <typename T, int Mode> static void dcn_host_op_shfl(dcn_host_block* b, unsigned int warp,
                                                             unsigned int mask) {
  for (unsigned int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    dcn_host_thread& t = b->threads[warp * 32 + lane];
    int param, width;
    std::memcpy(&param, t.in + 8, sizeof param);
    std::memcpy(&width, t.in + 12, sizeof width);
    const unsigned int w = (unsigned int)width, base = lane & ~(w - 1), sub = lane - base;
    unsigned int src = lane;
    if (Mode == 0) src = base + ((unsigned int)param % w);
    if (Mode == 1) src = sub >= (unsigned int)param ? lane - param : lane;
    if (Mode == 2) src = sub + (unsigned int)param < w ? lane + param : lane;
    if (Mode == 3) {
      src = lane ^ (unsigned int)param;
      if ((src & ~(w - 1)) != base) src = lane;
    }
    const T v = dcn_host_shfl_result<T>(b, warp, mask, lane, src);
    std::memcpy(t.out, &v, sizeof v);
  }
}

static void dcn_host_op_vote(dcn_host_block* b, unsigned int warp, unsigned int mask) {
  unsigned int ballot = 0;
  for (unsigned int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && b->threads[warp * 32 + lane].predicate) ballot |= 1u << lane;
  for (unsigned int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1u) b->threads[warp * 32 + lane].result = (int)ballot;
}

static void dcn_host_check_width(int width, const char* what, const char* file, int line) {
  if (width < 1 || width > 32 || (width & (width - 1))) {
    char text[256];
    std::snprintf(text, sizeof text, "%s: width must be a power of 2 in [1, 32], got %d, at %s:%d",
                  what, width, file, line);
    dcn_host_fail(text);
  }
}

template <typename T, int Mode>
static T dcn_host_shfl(const char* what, unsigned int mask, T value, int param, int width,
                       const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  dcn_host_check_width(width, what, file, line);
  dcn_host_block* b = dcn_host_need_cooperative(what, file, line);
  dcn_host_thread* self = b->current;
  std::memcpy(self->in, &value, sizeof value);
  std::memcpy(self->in + 8, &param, sizeof param);
  std::memcpy(self->in + 12, &width, sizeof width);
  dcn_host_warp_wait(dcn_host_op_shfl<T, Mode>, what, mask, file, line);
  T out;
  std::memcpy(&out, b->current->out, sizeof out);
  return out;
}

#define __shfl_sync(mask, v, src, ...) \
  dcn_host_shfl_fn<0>("__shfl_sync", mask, v, src, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) \
  dcn_host_shfl_fn<1>("__shfl_up_sync", mask, v, d, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) \
  dcn_host_shfl_fn<2>("__shfl_down_sync", mask, v, d, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) \
  dcn_host_shfl_fn<3>("__shfl_xor_sync", mask, v, m, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)

template <int Mode, typename T>
static T dcn_host_shfl_fn(const char* what, unsigned int mask, T value, int param,
                          const char* file, int line, int width = 32) {
  return dcn_host_shfl<T, Mode>(what, mask, value, param, width, file, line);
}

static unsigned int dcn_host_vote(const char* what, unsigned int mask, int predicate,
                                  const char* file, int line) {
  dcn_host_block* b = dcn_host_need_cooperative(what, file, line);
  b->current->predicate = predicate != 0;
  dcn_host_warp_wait(dcn_host_op_vote, what, mask, file, line);
  return (unsigned int)b->current->result;
}

#define __syncthreads() ((void)dcn_host_syncthreads(1, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) dcn_host_syncthreads(2, (p), __FILE__, __LINE__)
#define __syncthreads_and(p) dcn_host_syncthreads(3, (p), __FILE__, __LINE__)
#define __syncthreads_or(p) dcn_host_syncthreads(4, (p), __FILE__, __LINE__)
#define __syncwarp(...) dcn_host_syncwarp(__FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __ballot_sync(mask, p) dcn_host_vote("__ballot_sync", (mask), (p), __FILE__, __LINE__)
#define __any_sync(mask, p) \
  (dcn_host_vote("__any_sync", (mask), (p), __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) \
  (dcn_host_vote("__all_sync", (mask), (p), __FILE__, __LINE__) == (unsigned int)(mask))

static void dcn_host_syncwarp(const char* file, int line, unsigned int mask = 0xffffffffu) {
  dcn_host_warp_wait(dcn_host_op_syncwarp, "__syncwarp", mask, file, line);
}

// ---------------------------------------------------------------- atomics

template <typename T> static T dcn_host_atomic_add(T* address, T value) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, old + value, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
  }
}

// Built-in atomics cannot CAS a float directly: go through its bits.
static float dcn_host_atomic_add_bits(float* address, float value) {
  unsigned int* word = reinterpret_cast<unsigned int*>(address);
  unsigned int old = __atomic_load_n(word, __ATOMIC_RELAXED), next;
  float f;
  do {
    std::memcpy(&f, &old, sizeof f);
    f += value;
    std::memcpy(&next, &f, sizeof next);
  } while (!__atomic_compare_exchange_n(word, &old, next, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
  std::memcpy(&f, &old, sizeof f);
  return f;
}
static double dcn_host_atomic_add_bits(double* address, double value) {
  unsigned long long* word = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = __atomic_load_n(word, __ATOMIC_RELAXED), next;
  double f;
  do {
    std::memcpy(&f, &old, sizeof f);
    f += value;
    std::memcpy(&next, &f, sizeof next);
  } while (!__atomic_compare_exchange_n(word, &old, next, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
  std::memcpy(&f, &old, sizeof f);
  return f;
}

static inline float atomicAdd(float* a, float v) {
  if (!dcn_host_atomic) { const float old = *a; *a = old + v; return old; }
  return dcn_host_atomic_add_bits(a, v);
}
static inline double atomicAdd(double* a, double v) {
  if (!dcn_host_atomic) { const double old = *a; *a = old + v; return old; }
  return dcn_host_atomic_add_bits(a, v);
}
static inline int atomicAdd(int* a, int v) { return dcn_host_atomic_add(a, v); }
static inline unsigned int atomicAdd(unsigned int* a, unsigned int v) {
  return dcn_host_atomic_add(a, v);
}
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return dcn_host_atomic_add(a, v);
}
static inline int atomicMax(int* a, int v) {
  int old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED,
                                                  __ATOMIC_RELAXED)) {
  }
  return old;
}
static inline int atomicMin(int* a, int v) {
  int old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED,
                                                  __ATOMIC_RELAXED)) {
  }
  return old;
}
static inline int atomicCAS(int* a, int compare, int v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
static inline unsigned int atomicCAS(unsigned int* a, unsigned int compare, unsigned int v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
static inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }

// Shared-memory atomics: a block's fibers run on one OS thread, so the
// operation is a read and a write with no switch between them; it is not
// recorded for race detection (atomics do not race with each other).
template <typename T, typename V> static T atomicAdd(dcn_shared_array<T> p, V value) {
  T* address = reinterpret_cast<T*>(p.alloc->data.data() + p.base);
  T old;
  std::memcpy(&old, address, sizeof old);
  const T next = (T)(old + value);
  std::memcpy(address, &next, sizeof next);
  return old;
}

// ---------------------------------------------------------------- cp.async

static void dcn_host_drain_copies(dcn_host_block* b, dcn_host_thread& t, std::size_t keep_groups) {
  // land every copy except those of the newest `keep_groups` committed groups
  // and of the uncommitted tail (cp.async.wait_group semantics)
  std::size_t land = 0;
  if (t.group_ends.size() > keep_groups) land = t.group_ends[t.group_ends.size() - 1 - keep_groups];
  if (keep_groups == 0 && t.state == DCN_DONE) land = t.copies.size();
  for (std::size_t k = 0; k < land; ++k) {
    dcn_host_copy& c = t.copies[k];
    dcn_host_record(b, c.alloc, c.offset, c.size, true, t.tid, c.file, c.line);
    std::memcpy(c.dst, c.bytes, c.size);
  }
  t.copies.erase(t.copies.begin(), t.copies.begin() + land);
  std::vector<std::size_t> ends;
  for (std::size_t e : t.group_ends)
    if (e > land) ends.push_back(e - land);
  t.group_ends.swap(ends);
}

template <int Bytes, typename T>
static void dcn_host_cp_async(dcn_shared_array<T> dst, const dcn_host_index& i, const void* src) {
  dcn_host_block* b = dcn_host_need_cooperative("cp.async", i.file, i.line);
  const std::size_t offset = dst.bytes_at(i, Bytes);
  if (offset % Bytes || (std::uintptr_t)src % Bytes) {
    char text[512];
    std::snprintf(text, sizeof text,
                  "%s: cp.async of %d bytes at %s:%d needs both addresses aligned to %d bytes "
                  "(shared offset %zu, global address %p)", dcn_host_where(b).c_str(), Bytes,
                  i.file, i.line, Bytes, offset, src);
    dcn_host_fail(text);
  }
  dcn_host_copy c;
  c.alloc = dst.alloc;
  c.offset = offset;
  c.dst = dst.alloc->data.data() + offset;
  c.size = Bytes;
  std::memcpy(c.bytes, src, Bytes);
  c.file = i.file;
  c.line = i.line;
  b->current->copies.push_back(c);
}

static void dcn_host_cp_async_commit() {
  dcn_host_block* b = dcn_host_need_cooperative("cp.async.commit_group", "", 0);
  dcn_host_thread* t = b->current;
  t->group_ends.push_back(t->copies.size());
}

static void dcn_host_cp_async_wait(int n) {
  dcn_host_block* b = dcn_host_need_cooperative("cp.async.wait_group", "", 0);
  dcn_host_drain_copies(b, *b->current, (std::size_t)n);
}

// ---------------------------------------------------------------- ldmatrix and mma

// in: [alloc*][offset]; each lane gives the address of one 16-byte row.
template <int Matrices, bool Trans>
static void dcn_host_op_ldmatrix(dcn_host_block* b, unsigned int warp, unsigned int mask) {
  if (mask != 0xffffffffu) {
    dcn_host_fail(dcn_host_where(b) + ": ldmatrix is .sync.aligned: the whole warp must execute "
                  "it (mask 0xffffffff)");
  }
  unsigned short rows[4][8][8];
  for (int m = 0; m < Matrices; ++m) {
    for (int r = 0; r < 8; ++r) {
      dcn_host_thread& src = b->threads[warp * 32 + m * 8 + r];
      dcn_host_alloc* a;
      std::size_t offset;
      std::memcpy(&a, src.in, sizeof a);
      std::memcpy(&offset, src.in + 8, sizeof offset);
      dcn_host_record(b, a, offset, 16, false, src.tid, src.file, src.line);
      std::memcpy(rows[m][r], a->data.data() + offset, 16);
    }
  }
  for (unsigned int lane = 0; lane < 32; ++lane) {
    dcn_host_thread& t = b->threads[warp * 32 + lane];
    unsigned int out[4];
    for (int m = 0; m < Matrices; ++m) {
      const unsigned int g = lane / 4, c = 2 * (lane % 4);
      unsigned short lo, hi;
      if (Trans) { lo = rows[m][c][g]; hi = rows[m][c + 1][g]; }
      else { lo = rows[m][g][c]; hi = rows[m][g][c + 1]; }
      out[m] = (unsigned int)lo | ((unsigned int)hi << 16);
    }
    std::memcpy(t.out, out, sizeof out);
  }
}

template <int Matrices, bool Trans, typename T>
static void dcn_host_ldmatrix(unsigned int* r, dcn_shared_array<T> s, const dcn_host_index& i) {
  const char* name = Trans ? "ldmatrix.trans" : "ldmatrix";
  dcn_host_block* b = dcn_host_need_cooperative(name, i.file, i.line);
  dcn_host_thread* self = b->current;
  const unsigned int lane = self->tid % 32;
  std::size_t offset = 0;
  if ((int)(lane / 8) < Matrices) {  // lanes past the matrices give no address
    offset = s.bytes_at(i, 16);
    if (offset % 16) {
      char text[256];
      std::snprintf(text, sizeof text, "%s: ldmatrix row address not 16-byte aligned at %s:%d",
                    dcn_host_where(b).c_str(), i.file, i.line);
      dcn_host_fail(text);
    }
  }
  dcn_host_alloc* a = s.alloc;
  std::memcpy(self->in, &a, sizeof a);
  std::memcpy(self->in + 8, &offset, sizeof offset);
  dcn_host_warp_wait(dcn_host_op_ldmatrix<Matrices, Trans>, name, 0xffffffffu, i.file, i.line);
  std::memcpy(r, b->current->out, Matrices * sizeof(unsigned int));
}

// Input types of mma: 0 f16, 1 bf16, 2 tf32 (each rounded to its type: f16 and
// bf16 are exact in registers; tf32 keeps the top 19 bits of the f32 pattern).
static float dcn_host_mma_value(unsigned int word, int half, int type) {
  if (type == 2) {
    unsigned int u = word & 0xffffe000u;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  const unsigned short bits = (unsigned short)(half ? word >> 16 : word & 0xffffu);
  if (type == 1) {
    unsigned int u = (unsigned int)bits << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  unsigned int sign = (bits & 0x8000u) << 16, exp = (bits >> 10) & 0x1fu, man = bits & 0x3ffu;
  unsigned int u;
  if (exp == 0x1fu) u = sign | 0x7f800000u | (man << 13);
  else if (exp == 0) {
    float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  } else u = sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// in: a[4] b[2] c[4] as 32-bit words; out: d[4] floats. Layouts: PTX ISA,
// "Matrix fragments for mma.m16n8k16" (f16/bf16) and "mma.m16n8k8" (tf32).
template <int Type> static void dcn_host_op_mma(dcn_host_block* b, unsigned int warp,
                                                unsigned int mask) {
  if (mask != 0xffffffffu) {
    dcn_host_fail(dcn_host_where(b) + ": mma.sync is .aligned: the whole warp must execute it");
  }
  const int K = Type == 2 ? 8 : 16;
  float A[16][16], B[16][8], C[16][8];
  for (unsigned int lane = 0; lane < 32; ++lane) {
    const unsigned int* in = reinterpret_cast<const unsigned int*>(b->threads[warp * 32 + lane].in);
    const unsigned int g = lane / 4, t = lane % 4;
    if (Type == 2) {
      A[g][t] = dcn_host_mma_value(in[0], 0, 2);
      A[g + 8][t] = dcn_host_mma_value(in[1], 0, 2);
      A[g][t + 4] = dcn_host_mma_value(in[2], 0, 2);
      A[g + 8][t + 4] = dcn_host_mma_value(in[3], 0, 2);
      B[t][g] = dcn_host_mma_value(in[4], 0, 2);
      B[t + 4][g] = dcn_host_mma_value(in[5], 0, 2);
    } else {
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = dcn_host_mma_value(in[0], h, Type);
        A[g + 8][2 * t + h] = dcn_host_mma_value(in[1], h, Type);
        A[g][2 * t + 8 + h] = dcn_host_mma_value(in[2], h, Type);
        A[g + 8][2 * t + 8 + h] = dcn_host_mma_value(in[3], h, Type);
        B[2 * t + h][g] = dcn_host_mma_value(in[4], h, Type);
        B[2 * t + 8 + h][g] = dcn_host_mma_value(in[5], h, Type);
      }
    }
    float c[4];
    std::memcpy(c, in + 6, sizeof c);
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];  // exact products, f32 sums
      D[m][n] = acc;
    }
  for (unsigned int lane = 0; lane < 32; ++lane) {
    const unsigned int g = lane / 4, t = lane % 4;
    float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
    std::memcpy(b->threads[warp * 32 + lane].out, d, sizeof d);
  }
}

template <int Type>
static void dcn_host_mma(float* d, const unsigned int* a, const unsigned int* bm, const float* c,
                         const char* file, int line) {
  const char* name = Type == 0 ? "mma.sync.m16n8k16.f16" : Type == 1 ? "mma.sync.m16n8k16.bf16"
                                                                     : "mma.sync.m16n8k8.tf32";
  dcn_host_block* b = dcn_host_need_cooperative(name, file, line);
  unsigned int* in = reinterpret_cast<unsigned int*>(b->current->in);
  std::memcpy(in, a, 4 * sizeof(unsigned int));
  std::memcpy(in + 4, bm, 2 * sizeof(unsigned int));
  std::memcpy(in + 6, c, 4 * sizeof(float));
  dcn_host_warp_wait(dcn_host_op_mma<Type>, name, 0xffffffffu, file, line);
  std::memcpy(d, b->current->out, 4 * sizeof(float));
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
static float dcn_host_to_tf32(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
