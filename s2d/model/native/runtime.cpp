// The s2d CPU runtime: a Llama-family decoder pass over a few new tokens (a decode step, a block of
// draft tokens to verify, a token tree, a sorted draft's catch-up) in one call from Python.
//
// Why a runtime of our own: an eager torch step spends most of its time outside the weight reads
// (~20 small ops per layer, each a dispatch and a fork-join of the thread pool), and torch's bf16
// matrix-vector product reads weights at half the memory bandwidth llama.cpp reaches. Here one call
// runs the whole layer range on a pool of threads that stay hot, synchronised by spin barriers; the
// weights are read in place from the model's own tensors (no repacking, no second copy).
//
// Numerics, on purpose:
// - bf16 weights x bf16 activations with float32 accumulation (AVX512-BF16's dot product, or an
//   exact widening to float32 on AVX2), rounded back to the model's dtype where transformers rounds.
// - Every output element is reduced by one thread in a fixed order over k. A token's result depends
//   neither on how many tokens share the pass nor on the thread count: verifying a block of draft
//   tokens gives bit-identical logits to decoding them one by one, so speculative greedy output equals
//   plain greedy output even in bfloat16.
//
// Built once per machine by s2d/model/native/__init__.py (g++ -O3, no torch headers: seconds) and
// called through ctypes. The ISA-specific part, kernels.inc, is compiled twice (AVX2+FMA and
// AVX512+BF16) and chosen at run time, so one binary serves every x86-64 CPU with AVX2.
#include <dlfcn.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <type_traits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <mutex>
#include <thread>
#include <vector>

namespace s2d {

using bf16 = uint16_t;

inline float bf2f(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline bf16 f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline void cpu_relax() { _mm_pause(); }

// A waiting loop's step: pause, and every so often give the core away. On a machine with more
// runnable threads than cores (another process compiling, a second benchmark), pure spinning would
// burn the time slice the thread we wait for needs: passes became orders of magnitude slower without
// this (benchmarks/RESULTS.md, "Measurements behind the code").
inline void spin_wait(int& spins) {
  cpu_relax();
  if (++spins % 256 == 0) std::this_thread::yield();
}

// ---------------------------------------------------------------------------------------------
// The OpenMP runtime torch itself runs on (libgomp), when the caller hands us its path: running our
// passes on torch's own thread team means no second set of spinning threads competes with torch's
// (a torch argmax right after a pass took many times longer while our workers spun: benchmarks/RESULTS.md,
// "Measurements behind the code"), and the team is hot for both.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                           // omp_get_thread_num
  int (*num_threads)() = nullptr;                                          // omp_get_num_threads
};

OpenMP& openmp() {
  static OpenMP omp;
  return omp;
}

// ---------------------------------------------------------------------------------------------
// A spin barrier for the n threads of one job. It lives with the job's model, not with the pool: two
// models may run at once from two calling threads (overlapped drafting and verification), and each
// needs its own.
struct Barrier {
  void wait(int n) {
    if (n <= 1) return;
    const uint64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    } else {
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == gen) spin_wait(spins);
    }
  }

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<uint64_t> gen_{0};
};

// Runs fn(ctx, tid, n) on n threads (the caller is tid 0) and returns when all are done; inside fn,
// the job's Barrier synchronises them. On torch's OpenMP team when available (a calling thread outside
// any team gets a team of its own, so two callers may run at once); else on a fixed pool of our own,
// whose workers spin briefly after each job (a draft token's head follows its layers within
// microseconds), then sleep: one job at a time per such pool.
class Pool {
 public:
  using Fn = void (*)(void*, int, int);

  explicit Pool(int n) : n_(std::max(1, n)) {
    if (openmp().parallel != nullptr) return;  // torch's team does the work
    for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  int size() const { return n_; }

  void run(Fn fn, void* ctx) {
    if (n_ == 1) {
      fn(ctx, 0, 1);
      return;
    }
    if (openmp().parallel != nullptr) {
      OmpCall call{fn, ctx};
      openmp().parallel(&Pool::omp_entry, &call, static_cast<unsigned>(n_), 0);
      return;
    }
    std::lock_guard<std::mutex> busy(run_mu_);  // our workers serve one job at a time
    fn_ = fn;
    ctx_ = ctx;
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);  // no lost wake-up for a worker about to sleep
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    fn(ctx, 0, n_);
    int spins = 0;
    while (pending_.load(std::memory_order_acquire) > 0) spin_wait(spins);
  }

 private:
  struct OmpCall {
    Fn fn;
    void* ctx;
  };

  static void omp_entry(void* arg) {
    auto* call = static_cast<OmpCall*>(arg);
    call->fn(call->ctx, openmp().thread_num(), openmp().num_threads());
  }

  void worker(int tid) {
    uint64_t seen = 0;  // the generation at construction: a job posted before this thread ran is still seen
    for (;;) {
      auto spin_start = std::chrono::steady_clock::now();
      uint64_t gen;
      int spins = 0;
      while ((gen = gen_.load(std::memory_order_acquire)) == seen) {
        spin_wait(spins);
        if (spins % 256 == 0) {
          if (std::chrono::steady_clock::now() - spin_start > kSpin) {
            std::unique_lock<std::mutex> lock(mu_);
            sleepers_.fetch_add(1);
            cv_.wait(lock, [&] { return gen_.load() != seen; });
            sleepers_.fetch_sub(1);
          }
        }
      }
      seen = gen;
      if (stop_.load()) return;
      fn_(ctx_, tid, n_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Long enough to bridge the calls of one decoding step (a draft token's layers, then its head), short
  // enough to leave the core to torch's own threads soon after: a worker spinning for milliseconds
  // made a torch argmax (an OpenMP region) many times slower (benchmarks/RESULTS.md, "Measurements behind
  // the code").
  static constexpr std::chrono::microseconds kSpin{100};

  int n_;
  std::vector<std::thread> threads_;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::mutex run_mu_;
  std::condition_variable cv_;
};

// ---------------------------------------------------------------------------------------------
// Packed weights (bf16 on every instruction set; AMX's tiles read them too). A row-major product reduces every output across the lanes of
// its accumulators and reads NB weight rows at once, short interleaved streams the hardware prefetcher
// follows badly (4 rows of 1,152 bytes streamed at half the rate of one sequential read here). Packed,
// a weight [N, K] is panels of kPanel outputs, each stored as its k-pairs in order: the uint32 at
// ((p * pairs + q) * kPanel + o) holds w[kPanel p + o][2q] (low half) and w[..][2q + 1] (high half), the
// operand layout of a bf16 dot product. A product then reads each thread's weights as one sequential
// stream, broadcasts an activation pair to every output of the panel, and accumulates each output in
// its own lane: no reductions, and an output's sum runs over its k-pairs in order whatever the rows.
constexpr int kPanel = 32;

// Whether products at this instruction set read packed bf16 weights: all three (AMX's tiles read the panels too).
inline bool packs_at(int isa) { return isa >= 1 && isa <= 3; }

struct AlignedFree {
  void operator()(uint32_t* p) const { std::free(p); }
};
using PackedBuffer = std::unique_ptr<uint32_t[], AlignedFree>;

// uint32 words of w [N, K] packed, rounded up to whole cache lines.
inline int64_t packed_words(int64_t N, int64_t K) {
  const int64_t words = (N + kPanel - 1) / kPanel * kPanel * ((K + 1) / 2);
  return (words + 15) / 16 * 16;
}

// uint32 words of one packed panel of a weight with K inputs: kPanel outputs x its k-pairs.
inline int64_t panel_words(int64_t K) { return (K + 1) / 2 * kPanel; }

// w [N, K] bf16 (rows of stride ldw elements) packed into panels at dst (packed_words(N, K)); odd K is
// padded with a zero pair half, and the last panel's missing outputs with zero weights. stride: uint32
// words from one panel's start to the next (0: a panel's own size, panels back to back).
inline void pack_into(const uint16_t* w, int64_t ldw, int64_t N, int64_t K, uint32_t* dst, int64_t stride = 0) {
  const int64_t pairs = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  if (stride == 0) stride = panel_words(K);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t o = 0; o < kPanel; ++o) {
      const int64_t n = p * kPanel + o;
      uint32_t* col = dst + p * stride + o;
      if (n >= N) {
        for (int64_t q = 0; q < pairs; ++q) col[q * kPanel] = 0;
        continue;
      }
      const uint16_t* row = w + n * ldw;
      for (int64_t q = 0; q < pairs; ++q) {
        const uint32_t lo = row[2 * q], hi = 2 * q + 1 < K ? row[2 * q + 1] : 0;
        col[q * kPanel] = lo | (hi << 16);
      }
    }
}

// A buffer of `words` uint32 for packed weights. Large ones are aligned to 2 MiB and asked to be backed by
// huge pages: a one-token pass streams every packed weight once, and with 4 KiB pages its TLB misses cost
// ~9% of a zoo-l pass here (Zen 4, transparent huge pages in madvise mode).
inline PackedBuffer packed_buffer(int64_t words) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(words) * sizeof(uint32_t);
  const size_t align = bytes >= kHuge ? kHuge : 64;
  const size_t size = (bytes + align - 1) / align * align;
  PackedBuffer out(static_cast<uint32_t*>(std::aligned_alloc(align, size > 0 ? size : align)));
  if (!out) throw std::bad_alloc();
  if (align == kHuge) madvise(out.get(), size, MADV_HUGEPAGE);  // advice only: without it, plain pages
  return out;
}

struct LayerWeights {
  const void* attn_norm;  // [C]
  const void* qkv_w;      // [(H + 2 Hkv) D, C]
  const void* qkv_b;      // [(H + 2 Hkv) D] or null
  const void* o_w;        // [C, H D]
  const void* o_b;        // [C] or null
  const void* mlp_norm;   // [C]
  const void* gu_w;       // [2 F, C]: gate rows, then up rows
  const void* gu_b;       // [2 F] or null
  const void* down_w;     // [C, F]
  const void* down_b;     // [C] or null
  // Packed copies (null: products read the row-major weights above). Gate and up separately, so that a
  // thread's share of each starts on a panel whatever F, but alternately in one buffer (gate panel p, up
  // panel p, gate panel p + 1, ...; gu_stride words from one gate panel to the next): a thread takes the
  // gate and up panels of the same outputs one after the other, so it reads one stream, not two (two
  // streams in separate buffers made the gate/up phase 4-9% slower where memory is fast; zoo-l, Zen 4:
  // benchmarks/RESULTS.md, seventh session).
  const uint32_t* qkv_p = nullptr;
  const uint32_t* o_p = nullptr;
  const uint32_t* gate_p = nullptr;
  const uint32_t* up_p = nullptr;
  const uint32_t* down_p = nullptr;
  int64_t gu_stride = 0;
};

struct Model;

// One sequence's rows in a pass over several sequences (s2d_run_layers_multi): rows row0 .. row0+rows-1
// of the pass attend only to this sequence's cache (and among themselves as its mask allows), written
// at its slots slot .. slot+rows-1. Every cache of one pass has the same layout (strides, capacity).
struct Segment {
  int row0, rows;
  void* kc;              // this sequence's key cache base
  void* vc;
  int64_t slot;          // its cache slot of its first new token
  const uint8_t* mask;   // [rows, rows] 1 = may attend among its new tokens; null = causal
};

// One call's arguments, shared by all threads.
struct Job {
  const Model* m;
  int T;                 // new tokens (rows)
  void* x;               // [T, C] model dtype, updated in place (layers) or read (logits)
  const int64_t* pos;    // [T] RoPE positions
  void* kc;              // key cache base (layer 0, batch 0, head 0, slot 0)
  void* vc;
  int64_t layer_stride;  // elements between layers of the cache
  int64_t head_stride;   // elements between KV heads of the cache
  int64_t slot;          // cache slot of the first new token
  int64_t capacity;      // slots per KV head in the cache
  const uint8_t* mask;   // [T, T] 1 = may attend among the new tokens; null = causal
  int start, end;        // layer range
  float* logits;         // [T, V] for the logits job (null: scratch, when only the top-1 is wanted)
  const void* head_w;    // the logits job's head [head_rows, C] (the model's, or a vocabulary subset)
  int64_t head_rows;
  void* top;             // non-null: the logits job also reduces each row to its top-1
  int nseg;              // > 0: the rows belong to these sequences (kc, vc, slot, mask above unused)
  const Segment* segs;
};

// One thread's share of one row's top-1 (the logits job); the softmax sum is kept in Scratch::top_chunks.
struct TopPart {
  float max;
  int64_t arg;
  bool finite;  // no NaN or inf among them (their plain sum is finite)
};

constexpr int kMaxRows = 64;         // tokens per pass (native.MAX_ROWS)
constexpr int64_t kKeyChunk = 256;  // keys per attention work unit (see kernels.inc)

// A product's output panels handed out at run time (see Ctx::claim): one counter per (product, thread),
// each on its own cache line.
struct alignas(64) Claim {
  std::atomic<int64_t> next{0};
};
constexpr int kStealRows = 16;  // passes of at most this many rows balance their products by claims

// Scratch, sized for the largest T seen. Shared buffers hold one phase's outputs for all threads;
// private ones hold what each thread computes redundantly (norms) or converts (AVX2 widening).
struct Scratch {
  int rows = 0;
  std::vector<float> lin;                  // [T, (H + 2 Hkv) D] qkv's outputs, float32: every thread reads them
  // per thread: [T, max(2F, C)] the outputs only their thread reads (gate/up, o and down, each read back by the
  // same claim), so that their stores and those loads stay in the core's own cache: in the shared lin the other
  // thread had read the lines last, and every store waited for them (zoo-l, the AVX512-BF16 Xeon: 6 rows 0.97x)
  std::vector<std::vector<float>> lin_own;
  std::vector<uint8_t> mlp;                // [T, F] model dtype
  std::vector<float> parts;                // [T, H, chunks, D + 2] attention partials
  std::vector<std::vector<uint8_t>> att;   // per thread: [T, H D] model dtype, the merged attention
  std::vector<std::vector<uint8_t>> xn;    // per thread: [T, C] model dtype
  std::vector<std::vector<float>> xf;      // per thread: [T, max K] float32
  std::vector<std::vector<float>> scores;  // per thread: [T, chunk] attention scores, then probabilities
  std::vector<float> queries;              // [H, T, D] the rotated queries (cache dtype), shared
  std::vector<std::vector<float>> lin_rows;  // per thread: [T, D] one head's attention outputs
  std::vector<std::vector<float>> pv_b;      // per thread: [chunk / 2, D] pair-interleaved values (AMX)
  std::vector<std::vector<float>> pv_a;      // per thread: [T, chunk] bf16 probabilities (AMX)
  std::vector<std::vector<float>> kv_virtual;  // per thread: [2, chunk, D] a masked row's keys and values
  std::vector<float> head_out;             // [T, head rows] logits when the caller wants only the top-1
  std::vector<uint8_t> hidden;             // [T, C] model dtype: s2d_greedy's rows when the caller keeps none
  std::vector<TopPart> top;                // [threads, T]
  std::vector<float> top_chunks;           // [T, ceil(head rows / 16)] sums of exp(logit - row max)
  std::unique_ptr<Claim[]> claims;         // [layers x 4 products x threads], reset before each layers job
  int64_t claims_size = 0;
};

using JobFn = void (*)(void*, int, int);

struct Kernels {
  JobFn layers[2][2];  // [weights bf16][cache bf16]
  JobFn greedy[2][2];  // layers, then the head's top-1 of every row: one job (s2d_greedy)
  JobFn logits[2];     // [weights bf16]
  JobFn linear[2];     // [bf16]
  void (*put_bf16)(const float*, int64_t, bf16*);  // float32 -> bf16 as passes store activations (vectors, then a tail)
  JobFn dot_peak;      // PeakArgs: registers-only multiply-adds, the arithmetic ceiling of the products
  int peak_flops;      // flops one dot_peak iteration does on one thread
};

// Where a pass's time goes, when profiling is on: thread 0's wall time per phase, in seconds.
enum Phase { PH_QKV, PH_KV, PH_ATTN, PH_O, PH_GATE_UP, PH_DOWN, PH_HEAD, PH_COUNT };

struct Profile {
  double seconds[PH_COUNT] = {};
  std::chrono::steady_clock::time_point last;
  void start() { last = std::chrono::steady_clock::now(); }
  void mark(int phase) {
    auto now = std::chrono::steady_clock::now();
    seconds[phase] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

struct Model {
  int num_layers, C, H, Hkv, D, F, V, max_pos;
  float eps;
  bool bf16_weights;
  std::vector<LayerWeights> layers;
  const float* cos;  // [max_pos, D] float32, as Transformer.cos
  const float* sin;  // [max_pos, D], sign folded in: rotate_half(x) * sin == roll(x, D/2) * table
  const void* final_norm;
  const void* head_w;  // [V, C]
  const void* embed_w = nullptr;  // [embed_rows, C] the input embedding (s2d_model_set_embedding), or null
  int64_t embed_rows = 0;
  const uint32_t* head_p = nullptr;  // packed head_w, or null
  bool packed = false;               // products read packed weights (see pack_into)
  PackedBuffer arena;                // every packed copy, one after the other (one huge-page region)
  int64_t arena_words = 0, arena_used = 0;
  Pool* pool;  // the default thread count's; a call may ask for another (s2d_run_layers, s2d_head)
  Kernels kernels;
  Scratch scratch;
  Job job;
  std::mutex mu;            // one call at a time per model: the scratch, job and barrier are the model's
  mutable Barrier barrier;  // the running job's threads
  bool profile = false;
  Profile prof;

  // The [N, K] of a layer's packed weights, in LayerWeights' order: qkv, o, gate, up, down.
  std::array<std::array<int64_t, 2>, 5> layer_shapes() const {
    const int64_t HD = static_cast<int64_t>(H) * D;
    return {{{static_cast<int64_t>(H + 2 * Hkv) * D, C}, {C, HD}, {F, C}, {F, C}, {C, F}}};
  }

  // A packed copy of w [N, K] bf16, kept as long as the model.
  const uint32_t* pack(const void* w, int64_t N, int64_t K) {
    if (arena_used + packed_words(N, K) > arena_words) return nullptr;  // not sized for it: read in place
    uint32_t* dst = arena.get() + arena_used;
    arena_used += packed_words(N, K);
    pack_into(static_cast<const uint16_t*>(w), K, N, K, dst);
    return dst;
  }

  // Packed copies of a and b, both [N, K] bf16, panels alternating (a's panel p, then b's): a's copy; b's
  // starts panel_words(K) later, and each one's panels are 2 * panel_words(K) apart. The arena holds
  // packed_words(N, K) for each.
  const uint32_t* pack_alternating(const void* a, const void* b, int64_t N, int64_t K) {
    if (arena_used + 2 * packed_words(N, K) > arena_words) return nullptr;
    uint32_t* dst = arena.get() + arena_used;
    arena_used += 2 * packed_words(N, K);
    pack_into(static_cast<const uint16_t*>(a), K, N, K, dst, 2 * panel_words(K));
    pack_into(static_cast<const uint16_t*>(b), K, N, K, dst + panel_words(K), 2 * panel_words(K));
    return dst;
  }

  int max_k() const { return std::max({C, H * D, F}); }
  size_t dsize() const { return bf16_weights ? 2 : 4; }

  // n: the call's threads. Per-thread buffers are kept for the most threads any call used, so a
  // model whose calls alternate between thread counts does not reallocate.
  void ensure_scratch(int rows, int64_t keys, int n) {
    Scratch& s = scratch;
    n = std::max(n, static_cast<int>(s.xn.size()));
    if (rows > s.rows || static_cast<int>(s.xn.size()) != n) {
      s.rows = std::max(rows, s.rows);
      s.lin.assign(static_cast<size_t>(s.rows) * (H + 2 * Hkv) * D, 0.f);
      s.lin_own.assign(n, std::vector<float>(static_cast<size_t>(s.rows) * std::max(2 * F, C)));
      s.att.assign(n, std::vector<uint8_t>(static_cast<size_t>(s.rows) * H * D * dsize()));
      s.mlp.assign(static_cast<size_t>(s.rows) * F * dsize(), 0);
      s.xn.assign(n, std::vector<uint8_t>(static_cast<size_t>(s.rows) * C * dsize()));
      s.xf.assign(n, std::vector<float>(static_cast<size_t>(s.rows) * max_k()));
      s.scores.assign(n, std::vector<float>(static_cast<size_t>(s.rows) * kKeyChunk));
      s.queries.assign(static_cast<size_t>(s.rows) * H * D, 0.f);
      s.lin_rows.assign(n, std::vector<float>(static_cast<size_t>(s.rows) * D));
      s.pv_b.assign(n, std::vector<float>(static_cast<size_t>(kKeyChunk / 2) * D));
      s.pv_a.assign(n, std::vector<float>(static_cast<size_t>(s.rows) * kKeyChunk / 2));
      s.kv_virtual.assign(n, std::vector<float>(static_cast<size_t>(2) * kKeyChunk * D));
    }
    const size_t parts = static_cast<size_t>(rows) * H * ((keys + kKeyChunk - 1) / kKeyChunk) * (D + 2);
    if (s.parts.size() < parts) s.parts.resize(parts);
  }

  // Before a logits job that reduces each row to its top-1: the threads' parts and the chunk sums, sized
  // (and the logits' scratch, when the caller does not want them).
  void prepare_top(int T, int64_t V, int n, bool logits_out) {
    Scratch& s = scratch;
    if (!logits_out && s.head_out.size() < static_cast<size_t>(T) * V) s.head_out.resize(static_cast<size_t>(T) * V);
    s.top.assign(static_cast<size_t>(n) * T, TopPart{-INFINITY, 0, true});
    s.top_chunks.resize(static_cast<size_t>(T) * ((V + 15) / 16));
  }

  // After it: each row's argmax (the first, as torch's) and softmax probability from the n threads' shares,
  // merged in column order (ties go to the lowest index; the same bits on any thread count). tokens and
  // probs may be null. Returns 0, or -4 when a row holds NaN or inf logits.
  int finish_top(int T, int64_t V, int n, int64_t* tokens, float* probs) const {
    const Scratch& s = scratch;
    for (const TopPart& p : s.top)
      if (!p.finite) return -4;
    const int64_t chunks = (V + 15) / 16;
    for (int t = 0; t < T; ++t) {
      float best = -INFINITY;
      int64_t arg = 0;
      for (int i = 0; i < n; ++i) {
        const TopPart& p = s.top[static_cast<size_t>(i) * T + t];
        if (p.max > best) best = p.max, arg = p.arg;
      }
      float sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) sum += s.top_chunks[static_cast<size_t>(t) * chunks + c];
      if (tokens) tokens[t] = arg;
      if (probs) probs[t] = 1.0f / sum;
    }
    return 0;
  }

  // Every product's claim counters back to 0 (before a layers job; the pool's start publishes them).
  void reset_claims(int n) {
    Scratch& s = scratch;
    const int64_t need = static_cast<int64_t>(num_layers) * 4 * n;
    if (s.claims_size < need) {
      s.claims.reset(new Claim[need]);
      s.claims_size = need;
    }
    for (int64_t i = 0; i < need; ++i) s.claims[i].next.store(0, std::memory_order_relaxed);
  }
};

// Threads 0 and 1 hand a counter back and forth `iters` times; thread 0 times it (s2d_handoff_ns).
struct HandoffArgs {
  int64_t iters;
  alignas(64) std::atomic<int64_t> turn{0};
  double seconds = 0.0;
};

inline void handoff_job(void* arg, int tid, int nt) {
  HandoffArgs& a = *static_cast<HandoffArgs*>(arg);
  if (nt < 2 || tid > 1) return;
  const int64_t warm = 1000;  // the first hand-offs wait for the other thread to wake: not timed
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < warm + a.iters; ++i) {
    if (i == warm) t0 = std::chrono::steady_clock::now();
    const int64_t mine = 2 * i + tid;  // thread 0 moves on even turns, thread 1 on odd ones
    while (a.turn.load(std::memory_order_acquire) != mine) cpu_relax();
    a.turn.store(mine + 1, std::memory_order_release);
  }
  if (tid == 0) a.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct PeakArgs {
  int64_t iters;
  float sink[64];  // per thread: what the accumulators summed to, so that the loop is not folded away
};

// A bare product's arguments (s2d_linear).
struct LinearArgs {
  const void* x;
  const void* w;
  float* y;
  int M;
  int64_t K, N;
  Pool* pool;
  Scratch* s;
  const uint32_t* packed;  // w packed (see pack_into), or null: the row-major product
};

// [begin, end) of n items for thread tid of nt, in multiples of align (the last takes the rest).
inline void split(int64_t n, int tid, int nt, int64_t align, int64_t* begin, int64_t* end) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t b0 = blocks * tid / nt, b1 = blocks * (tid + 1) / nt;
  *begin = std::min(n, b0 * align);
  *end = std::min(n, b1 * align);
}

// From how many rows a product's first call over a packed panel prefetches ahead (kernels.inc, kPrefetchBytes):
// S2D_NATIVE_PREFETCH_ROWS (1-64) if set, else 1 on Intel CPUs and kPrefetchRows on others; s2d_prefetch_rows
// changes it. Intel's prefetchers left even a one-row product waiting on memory (zoo-l one-token passes on the
// AMX Xeon, alternated in one process: held to AVX512-BF16 0.64-0.67x the time with the prefetches, held to AVX2
// 0.55x; 2 and 3 rows 0.52-0.57x); on the Zen 4 the prefetches only added requests below 4 rows (2 rows 14-24%
// more time), so other CPUs keep kPrefetchRows.
constexpr int kPrefetchRows = 4;
// A 0/1 switch from the environment: 0 or 1 where `name` starts with that digit, else -1 (unset or unreadable).
inline int env_switch(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && (env[0] == '0' || env[0] == '1') ? env[0] - '0' : -1;
}
inline bool cpu_is_intel() {
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0), "c"(0));
  return ebx == 0x756e6547u && edx == 0x49656e69u && ecx == 0x6c65746eu;  // "GenuineIntel"
}
inline int default_prefetch_rows() {
  static const int rows = [] {
    if (const char* env = std::getenv("S2D_NATIVE_PREFETCH_ROWS")) {
      const int r = std::atoi(env);
      if (r >= 1 && r <= 64) return r;
    }
    return cpu_is_intel() ? 1 : kPrefetchRows;
  }();
  return rows;
}
std::atomic<int> g_prefetch_rows{0};  // 0: default_prefetch_rows()
inline int prefetch_rows() {
  const int rows = g_prefetch_rows.load(std::memory_order_relaxed);
  return rows > 0 ? rows : default_prefetch_rows();
}

// Whether the AVX2 level's packed products run on 512-bit vectors (kernels.inc, wide_range): the same panels and
// the same bits, 16 outputs a vector. Only where the CPU has AVX-512 (F, BW, VL, DQ); by default only where it
// lacks AVX512-BF16 (Skylake to Ice Lake Xeons, whose best level is AVX2): on a CPU with AVX512-BF16 the AVX2
// level runs only when held to it (S2D_NATIVE_ISA=avx2), and then stays within AVX2. S2D_NATIVE_WIDE=0 or 1
// overrides the default (1 only where the CPU has AVX-512); s2d_wide_products changes it.
inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
inline bool default_wide_products() {
  static const bool wide = [] {
    if (!cpu_has_avx512()) return false;
    if (const int env = env_switch("S2D_NATIVE_WIDE"); env >= 0) return env == 1;
    return !__builtin_cpu_supports("avx512bf16");
  }();
  return wide;
}
std::atomic<int> g_wide_products{-1};  // -1: default_wide_products()
inline bool wide_products() {
  const int wide = g_wide_products.load(std::memory_order_relaxed);
  return wide < 0 ? default_wide_products() : wide == 1;
}

// Whether the CPU has AMX tiles with bf16 (CPUID.(7, 0):EDX bits 24 and 22), whether or not the kernel lets us use
// them (amx_usable asks).
inline bool cpu_has_amx() {
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  return ((edx >> 24) & 1) && ((edx >> 22) & 1);
}

// Whether the AVX512-BF16 level's packed products run as float32 FMAs on widened weights (kernels.inc, wide_range)
// rather than bf16 pair dot products: other bits (each output adds x[k] w[k] one k at a time, the AVX2 level's
// bits), the same for every row count. By default on Intel CPUs of the AMX generation (their AVX512-BF16 level runs
// where AMX cannot: a kernel or VM without tile permission, or S2D_NATIVE_ISA=avx512): on the AMX Xeon vdpbf16ps ran
// at 0.41x the 512-bit FMAs' flops (97 against 237 GFLOP/s on one core, registers only), and zoo-l passes held to
// AVX512-BF16 took 1.02x, 0.83x and 0.86x the time at 1, 6 and 16 rows with products and attention on FMAs. The
// Zen 4's dot products reached ~380 GFLOP/s on 2 cores (issue 27), more than its FMAs can (two 256-bit FMA units a
// core: ~240 at its clock), so other CPUs keep them, as does Cooper Lake (AVX512-BF16 without AMX: not measured).
// S2D_NATIVE_FMA=0 or 1 overrides the default; s2d_fma_products changes it.
inline bool default_fma_products() {
  static const bool fma = [] {
    if (const int env = env_switch("S2D_NATIVE_FMA"); env >= 0) return env == 1;
    return cpu_is_intel() && cpu_has_amx();
  }();
  return fma;
}
std::atomic<int> g_fma_products{-1};  // -1: default_fma_products()
inline bool fma_products() {
  const int fma = g_fma_products.load(std::memory_order_relaxed);
  return fma < 0 ? default_fma_products() : fma == 1;
}
}  // namespace s2d

// The ISA-specific kernels, compiled once per instruction set into their own namespace.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace s2d::avx2 {
#define S2D_AVX512 0
#include "kernels.inc"
#undef S2D_AVX512
}  // namespace s2d::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace s2d::avx512 {
#define S2D_AVX512 1
#include "kernels.inc"
#undef S2D_AVX512
}  // namespace s2d::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
namespace s2d::amx {
#define S2D_AVX512 1
#define S2D_AMX 1
#include "kernels.inc"
#undef S2D_AMX
#undef S2D_AVX512
}  // namespace s2d::amx
#pragma GCC pop_options

namespace {

// ctypes releases the GIL, so calls may come from several threads at once: each model takes its own
// lock (its scratch), each of our own pools serialises its jobs, and g_setup guards the global set-up
// (the OpenMP entry points, the list of pools). Calls on different models run concurrently.
std::mutex g_setup;

s2d::Kernels kernels_for(int isa) {
  if (isa >= 3) return s2d::amx::kernels();
  return isa >= 2 ? s2d::avx512::kernels() : s2d::avx2::kernels();
}

// AMX needs the CPU's tile instructions and the kernel's permission to use tile state (Linux 5.16+).
bool amx_usable() {
  if (!s2d::cpu_has_amx()) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// One pool per thread count, kept for the process's life: models hold a pointer to theirs.
s2d::Pool* shared_pool(int threads) {
  std::lock_guard<std::mutex> lock(g_setup);
  static std::vector<std::unique_ptr<s2d::Pool>> pools;
  for (auto& pool : pools)
    if (pool->size() == threads) return pool.get();
  pools.push_back(std::make_unique<s2d::Pool>(threads));
  return pools.back().get();
}

// A pass's rows and their positions checked: 0, -2 (not 1..kMaxRows rows) or -1 (a position outside the RoPE table).
int check_rows(const s2d::Model& m, int T, const int64_t* pos) {
  if (T < 1 || T > s2d::kMaxRows) return -2;
  for (int t = 0; t < T; ++t)
    if (pos[t] < 0 || pos[t] >= m.max_pos) return -1;
  return 0;
}

}  // namespace

extern "C" {

// Run passes on the OpenMP team of the libgomp at `path` (torch's, already loaded); returns 1 when it
// can, 0 when that library is not loaded or lacks the entry points (our own pool is used then).
int s2d_use_openmp(const char* path) {
  std::lock_guard<std::mutex> lock(g_setup);
  void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) return 0;
  s2d::OpenMP omp;
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(lib, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<decltype(omp.thread_num)>(dlsym(lib, "omp_get_thread_num"));
  omp.num_threads = reinterpret_cast<decltype(omp.num_threads)>(dlsym(lib, "omp_get_num_threads"));
  if (!omp.parallel || !omp.thread_num || !omp.num_threads) return 0;
  s2d::openmp() = omp;
  return 1;
}

// Whether the AVX2 level's packed products use 512-bit vectors (see wide_products): set if `wide` is 0 or 1 (1 only
// where the CPU has AVX-512); returns the value in force (0 or 1).
int s2d_wide_products(int wide) {
  if (wide == 0 || (wide == 1 && s2d::cpu_has_avx512())) s2d::g_wide_products.store(wide, std::memory_order_relaxed);
  return s2d::wide_products() ? 1 : 0;
}

// Whether the AVX512-BF16 level's packed products run on FMAs (see fma_products): set if `fma` is 0 or 1; returns the
// value in force (0 or 1).
int s2d_fma_products(int fma) {
  if (fma == 0 || fma == 1) s2d::g_fma_products.store(fma, std::memory_order_relaxed);
  return s2d::fma_products() ? 1 : 0;
}

// Rows from which products prefetch (see prefetch_rows): set to `rows` if 1-64; returns the value in force.
int s2d_prefetch_rows(int rows) {
  if (rows >= 1 && rows <= 64) s2d::g_prefetch_rows.store(rows, std::memory_order_relaxed);
  return s2d::prefetch_rows();
}

// 3 = AVX512-BF16 + AMX, 2 = AVX512 with BF16 dot products, 1 = AVX2 + FMA, 0 = unsupported
// (callers use torch).
int s2d_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16"))
    return amx_usable() ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

void* s2d_model_new(int num_layers, int hidden, int heads, int kv_heads, int head_dim, int ffn, int vocab,
                    int max_pos, float eps, int bf16_weights, const float* cos, const float* sin,
                    const void* final_norm, const void* head_w, int threads, int isa, int pack) {
  auto* m = new s2d::Model();
  m->num_layers = num_layers;
  m->C = hidden;
  m->H = heads;
  m->Hkv = kv_heads;
  m->D = head_dim;
  m->F = ffn;
  m->V = vocab;
  m->max_pos = max_pos;
  m->eps = eps;
  m->bf16_weights = bf16_weights != 0;
  m->layers.resize(num_layers);
  m->cos = cos;
  m->sin = sin;
  m->final_norm = final_norm;
  m->head_w = head_w;
  m->pool = shared_pool(threads);
  m->kernels = kernels_for(isa);
  m->packed = pack != 0 && s2d::packs_at(isa) && m->bf16_weights;
  if (m->packed) {
    int64_t layer = 0;
    for (const auto& [N, K] : m->layer_shapes()) layer += s2d::packed_words(N, K);
    m->arena_words = s2d::packed_words(vocab, hidden) + num_layers * layer;
    m->arena = s2d::packed_buffer(m->arena_words);
    m->head_p = m->pack(head_w, vocab, hidden);
  }
  return m;
}

void s2d_model_set_layer(void* handle, int i, const void* attn_norm, const void* qkv_w, const void* qkv_b,
                         const void* o_w, const void* o_b, const void* mlp_norm, const void* gu_w,
                         const void* gu_b, const void* down_w, const void* down_b) {
  auto* m = static_cast<s2d::Model*>(handle);
  s2d::LayerWeights& L = m->layers[i];
  L = {attn_norm, qkv_w, qkv_b, o_w, o_b, mlp_norm, gu_w, gu_b, down_w, down_b};
  if (m->packed) {
    const auto shapes = m->layer_shapes();
    const void* up_w = static_cast<const uint16_t*>(gu_w) + static_cast<int64_t>(m->F) * m->C;  // gu_w's up rows
    L.qkv_p = m->pack(qkv_w, shapes[0][0], shapes[0][1]);
    L.o_p = m->pack(o_w, shapes[1][0], shapes[1][1]);
    L.gate_p = m->pack_alternating(gu_w, up_w, shapes[2][0], shapes[2][1]);  // gate and up share a shape
    if (L.gate_p != nullptr) {
      L.up_p = L.gate_p + s2d::panel_words(shapes[2][1]);
      L.gu_stride = 2 * s2d::panel_words(shapes[2][1]);
    }
    L.down_p = m->pack(down_w, shapes[4][0], shapes[4][1]);
  }
}

// Profiling: on != 0 turns it on and clears the totals; out (may be null) receives the seconds per phase
// (qkv, kv write, attention, o, gate/up, down, head) accumulated since.
void s2d_profile(void* handle, int on, double* out) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  if (out)
    for (int i = 0; i < s2d::PH_COUNT; ++i) out[i] = m->prof.seconds[i];
  if (on >= 0) {
    m->profile = on != 0;
    m->prof = s2d::Profile();
  }
}

void s2d_model_free(void* handle) { delete static_cast<s2d::Model*>(handle); }

// Layers [start, end) over T new tokens: x [T, C] (model dtype) is updated in place; their keys and
// values are written to the cache at slots slot .. slot+T-1 (cache_bf16: the cache's dtype).
// threads: the threads this call runs on, 0 = the model's default (results do not depend on it).
// Returns 0, or -1 (nothing done) when a position lies outside the RoPE table.
int s2d_run_layers(void* handle, void* x, int T, const int64_t* pos, void* kc, void* vc, int cache_bf16,
                    int64_t layer_stride, int64_t head_stride, int64_t capacity, int64_t slot, const uint8_t* mask,
                    int start, int end, int threads) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  s2d::Pool* pool = threads > 0 ? shared_pool(threads) : m->pool;
  if (const int bad = check_rows(*m, T, pos)) return bad;
  m->ensure_scratch(T, slot + T, pool->size());
  if (slot + T > capacity) return -3;
  m->reset_claims(pool->size());
  m->job = {m, T, x, pos, kc, vc, layer_stride, head_stride, slot, capacity, mask, start, end, nullptr, nullptr, 0,
            nullptr};
  if (m->profile) m->prof.start();
  pool->run(m->kernels.layers[m->bf16_weights][cache_bf16 != 0], &m->job);
  return 0;
}

// Layers [start, end) over the rows of several sequences in one pass: x [T, C] as s2d_run_layers; sequence
// i owns the next seg_rows[i] rows, attends to its own cache (kcs[i], vcs[i]; every cache of the same layout)
// and writes its keys and values at slots slots[i] ..; masks[i]: its [rows, rows] tree mask, or null (a
// chain). The weights are read once for all rows; each row's result is bit-identical to the same row in a
// pass of its sequence alone. Returns as s2d_run_layers, and -5 for segments that do not cover 1..T rows.
int s2d_run_layers_multi(void* handle, void* x, int T, const int64_t* pos, int nseg, const int* seg_rows,
                         void* const* kcs, void* const* vcs, const int64_t* slots, const uint8_t* const* masks,
                         int cache_bf16, int64_t layer_stride, int64_t head_stride, int64_t capacity, int start,
                         int end, int threads) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  s2d::Pool* pool = threads > 0 ? shared_pool(threads) : m->pool;
  if (const int bad = check_rows(*m, T, pos)) return bad;
  if (nseg < 1 || nseg > T) return -5;
  static thread_local std::vector<s2d::Segment> segs;
  segs.assign(nseg, {});
  int row0 = 0;
  int64_t keys = 0;
  for (int i = 0; i < nseg; ++i) {
    if (seg_rows[i] < 1) return -5;
    if (slots[i] < 0 || slots[i] + seg_rows[i] > capacity) return -3;
    segs[i] = {row0, seg_rows[i], kcs[i], vcs[i], slots[i], masks ? masks[i] : nullptr};
    row0 += seg_rows[i];
    keys = std::max(keys, slots[i] + seg_rows[i]);
  }
  if (row0 != T) return -5;
  m->ensure_scratch(T, keys, pool->size());
  m->reset_claims(pool->size());
  m->job = {m, T, x, pos, kcs[0], vcs[0], layer_stride, head_stride, slots[0], capacity, nullptr, start, end, nullptr,
            nullptr, 0, nullptr, nseg, segs.data()};
  if (m->profile) m->prof.start();
  pool->run(m->kernels.layers[m->bf16_weights][cache_bf16 != 0], &m->job);
  return 0;
}

// Final norm and LM head over T rows: x [T, C] (model dtype) -> out [T, V] float32 logits (out may be
// null), and where tokens/probs are non-null each row's argmax (the first, as torch's) and its
// softmax probability. head_w/rows: another head (a vocabulary subset, [rows, C]); null/0: the model's.
// threads: as s2d_run_layers. Returns 0, or -4 when a row asked for its top-1 holds NaN or inf logits.
int s2d_head(void* handle, const void* x, int T, const void* head_w, int64_t rows, float* out, int64_t* tokens,
             float* probs, int threads) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  s2d::Pool* pool = threads > 0 ? shared_pool(threads) : m->pool;
  if (T < 1 || T > s2d::kMaxRows) return -2;
  const int64_t V = head_w ? rows : m->V;
  m->ensure_scratch(T, 0, pool->size());
  const bool top = tokens != nullptr || probs != nullptr;
  if (top) m->prepare_top(T, V, pool->size(), out != nullptr);
  m->job = {m, T, const_cast<void*>(x), nullptr, nullptr, nullptr, 0, 0, 0, 0, nullptr, 0, 0, out,
            head_w ? head_w : m->head_w, V, top ? &m->scratch.top : nullptr};
  if (m->profile) m->prof.start();
  pool->run(m->kernels.logits[m->bf16_weights], &m->job);
  return top ? m->finish_top(T, V, pool->size(), tokens, probs) : 0;
}

// The input embedding s2d_greedy reads: w [rows, C] in the model's dtype, kept alive by the caller.
void s2d_model_set_embedding(void* handle, const void* w, int64_t rows) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  m->embed_w = w;
  m->embed_rows = rows;
}

// A greedy pass in one call: the embedding rows of ids [T] into x [T, C] (model dtype; null: the model's
// scratch), every layer over them (keys and values at slots slot .. as s2d_run_layers; x ends as the last
// layer's output), then the final norm and head, each row reduced to its argmax in tokens [T]: the same
// bits as s2d_run_layers followed by s2d_head, in one job on the threads (no return to the caller between).
// Returns as s2d_run_layers and s2d_head, and -6 (nothing done) for a token outside the embedding or a
// model without one.
int s2d_greedy(void* handle, const int64_t* ids, int T, const int64_t* pos, void* kc, void* vc, int cache_bf16,
               int64_t layer_stride, int64_t head_stride, int64_t capacity, int64_t slot, const uint8_t* mask,
               void* x, int64_t* tokens, int threads) {
  auto* m = static_cast<s2d::Model*>(handle);
  std::lock_guard<std::mutex> lock(m->mu);
  s2d::Pool* pool = threads > 0 ? shared_pool(threads) : m->pool;
  if (const int bad = check_rows(*m, T, pos)) return bad;
  if (m->embed_w == nullptr) return -6;
  for (int t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= m->embed_rows) return -6;
  if (slot < 0 || slot + T > capacity) return -3;
  const size_t row_bytes = static_cast<size_t>(m->C) * m->dsize();
  if (x == nullptr) {
    std::vector<uint8_t>& own = m->scratch.hidden;
    if (own.size() < T * row_bytes) own.resize(T * row_bytes);
    x = own.data();
  }
  for (int t = 0; t < T; ++t)
    std::memcpy(static_cast<char*>(x) + t * row_bytes, static_cast<const char*>(m->embed_w) + ids[t] * row_bytes,
                row_bytes);
  m->ensure_scratch(T, slot + T, pool->size());
  m->reset_claims(pool->size());
  m->prepare_top(T, m->V, pool->size(), false);
  m->job = {m, T, x, pos, kc, vc, layer_stride, head_stride, slot, capacity, mask, 0, m->num_layers, nullptr,
            m->head_w, m->V, &m->scratch.top};
  if (m->profile) m->prof.start();
  pool->run(m->kernels.greedy[m->bf16_weights][cache_bf16 != 0], &m->job);
  return m->finish_top(T, m->V, pool->size(), tokens, nullptr);
}

// y [M, N] float32 = x [M, K] @ w [N, K]^T, both float32 or both bf16: the product every pass uses,
// exposed for tests and measurements.
// packed: w's packed copy (s2d_pack; bf16 where packs_at(isa)), or null for the row-major product.
void s2d_linear(const void* x, const void* w, float* y, int M, int64_t K, int64_t N, int bf16, int threads, int isa,
                const uint32_t* packed) {
  s2d::Scratch scratch;
  scratch.xf.assign(threads, std::vector<float>(static_cast<size_t>(M) * K));
  s2d::LinearArgs args{x, w, y, M, K, N, shared_pool(threads), &scratch,
                      bf16 && s2d::packs_at(isa) ? packed : nullptr};
  args.pool->run(kernels_for(isa).linear[bf16 != 0], &args);
}

// out[i] = x[i] rounded to bf16 by the kernels of `isa`, as passes store activations (for tests).
void s2d_put_bf16(const float* x, int64_t n, uint16_t* out, int isa) { kernels_for(isa).put_bf16(x, n, out); }

// The multiply-add ceiling of `isa`'s products on `threads` threads, GFLOP/s: `iters` rounds of 12 independent
// accumulators through the widest multiply-add the products use (AVX512-BF16: bf16 pair dot products; AVX2:
// float32 FMAs, 512-bit where its products are: wide_products; 512-bit FMAs where AVX512-BF16's products run on
// them: fma_products), registers only. AMX tiles are not measured: 0.
double s2d_dot_peak(int isa, int threads, int64_t iters) {
  if (isa >= 3 || threads < 1 || threads > 64) return 0.0;
  s2d::Kernels k = kernels_for(isa);
  if (isa == 1 && s2d::wide_products()) k.peak_flops *= 2;  // 16 lanes, not 8
  if (isa == 2 && s2d::fma_products()) k.peak_flops /= 2;   // an FMA, not a pair dot product, a lane
  s2d::PeakArgs args{iters, {}};
  s2d::Pool* pool = shared_pool(threads);
  const auto t0 = std::chrono::steady_clock::now();
  pool->run(k.dot_peak, &args);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(iters) * k.peak_flops * threads / seconds / 1e9;
}

// Nanoseconds for one hand-off of a cache line between the first two of `threads` threads (each way): ~30 on
// two cores that share an L3, several times that across dies. 0 with one thread.
double s2d_handoff_ns(int threads, int64_t iters) {
  if (threads < 2 || iters < 1) return 0.0;
  s2d::HandoffArgs args;
  args.iters = iters;
  shared_pool(threads)->run(s2d::handoff_job, &args);
  return args.seconds / (2.0 * iters) * 1e9;
}

// The packed copy of a bf16 weight [N, K] (see pack_into) into out: s2d_packed_size(N, K) uint32.
int64_t s2d_packed_size(int64_t N, int64_t K) { return s2d::packed_words(N, K); }

void s2d_pack(const void* w, int64_t N, int64_t K, uint32_t* out) {
  std::memset(out, 0, static_cast<size_t>(s2d::packed_words(N, K)) * sizeof(uint32_t));  // the line padding
  s2d::pack_into(static_cast<const uint16_t*>(w), K, N, K, out);
}

}  // extern "C"
