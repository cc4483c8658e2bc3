// Native CPU kernels for the STL fast path (strassenkit/functional/ops.py), float32 and float64 (and bf16 I/O).
//
// Three ops, registered as torch.ops.strassenkit_native.*:
//
//   encode(x (B,M,K), enc (r, n*m), n, m, Mt, Kt, want_out, G (r,B*Mt,Kt) or empty)
//       -> (out (r, B*Mt, Kt) or empty,  genc (r, n*m) or empty)
//       out[l, b*Mt+a, c] = sum_ij enc[l, i*m+j] x[b, a*n+i, c*m+j]   (zero outside x)
//       genc[l, i*m+j]    = sum_{b,a,c} G[l, b*Mt+a, c] x[b, a*n+i, c*m+j]   (encoder gradient)
//   decode(P (r, B*Mt, Nt), dec (n*p, r), n, p, B, Mt, M, N) -> y (B, M, N)
//       y[b, a*n+i, c*p+k] = sum_l dec[i*p+k, l] P[l, b*Mt+a, c]
//   bmm(a (r,X,Y), b (r,Y,Z)) -> (r,X,Z): the r GEMMs split across threads, each single-threaded.
//   encode_bf16 / decode_bf16: encode (and encoder gradient) and decode of bfloat16 tensors, float32 arithmetic, one
//       rounding to bf16 (the bf16 fast path on CPUs with native bf16 GEMMs; the core bmm stays bf16).
// The fused path (fused_forward / fused_backward) runs all stages per block of tile rows (see below).
//
// Why: encode and decode are GEMMs with a tiny inner dimension (n*m or r) over millions of columns,
// preceded/followed by a strided tile permutation. BLAS runs them far below peak and barely scales
// across threads. Here the columns of the bmm layout (tile row, tile column) are cut into chunks of
// kChunk; threads take slices of chunks from a shared queue (see WorkQueue), gather each chunk's
// tiles into an L1 buffer (vector shuffles for float 4-wide tiles), run a register-blocked
// micro-kernel, and write straight into the destination layout, so x and y are read/written exactly
// once. The r core GEMMs scale better as r independent single-threaded GEMMs (taken from a queue too)
// than as one multi-threaded bmm on few cores.
//
// Portable C++ with GCC/Clang vector extensions (32-byte vectors; AVX2+FMA when compiled with
// -mavx2 -mfma, SSE pairs otherwise). The pure-PyTorch path in ops.py computes the same thing and
// tests compare the two.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// The code path for this CPU. strassenkit/functional/native.py reads the CPU's flags at load time and
// compiles this file once per path (the build folder's name includes the flags): "avx512" (-mavx512f
// ...: 64-byte vectors, 32 registers), "avx2" (-mavx2 -mfma: 32-byte vectors), "generic" (no flags: the
// compiler's baseline SIMD). STRASSENKIT_VEC_BYTES overrides the vector width at build time (native.py:
// STRASSENKIT_VEC_BYTES=64 builds the 64-byte code on an AVX2 CPU, which is how that logic is tested
// where there is no AVX-512).
#ifndef STRASSENKIT_VEC_BYTES
#if defined(__AVX512F__)
#define STRASSENKIT_VEC_BYTES 64
#else
#define STRASSENKIT_VEC_BYTES 32
#endif
#endif
#if defined(__AVX512F__)
#define STRASSENKIT_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define STRASSENKIT_ISA "avx2"
#else
#define STRASSENKIT_ISA "generic"
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(STRASSENKIT_VEC_BYTES)));
  static constexpr int width = STRASSENKIT_VEC_BYTES / sizeof(T);
};
typedef float v8f __attribute__((vector_size(32)));  // the 4-wide tile shuffles work on 8 floats at a time
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Streaming (non-temporal) stores for outputs larger than the per-core caches: they skip the read-
// for-ownership of every destination line, about a third of the memory traffic of encode and decode.
// Used when the output exceeds kStreamBytes (below it the output is re-read soon from cache). 4 MiB
// beat 32 MiB in same-machine A/B runs: d=128 training step 3 of 3, 2048^3 training step 5 of 6.
#ifndef STRASSENKIT_STREAM_MB  // overridable at build time for A/B timing
#define STRASSENKIT_STREAM_MB 4
#endif
constexpr size_t kStreamBytes = size_t(STRASSENKIT_STREAM_MB) << 20;
size_t stream_bytes() {  // the unfused encode/decode threshold; STRASSENKIT_STREAM_MB for A/B timing
  static const size_t b = [] {
    const char* v = std::getenv("STRASSENKIT_STREAM_MB");
    return v ? size_t(std::atol(v)) << 20 : kStreamBytes;
  }();
  return b;
}
size_t fused_stream_bytes() {  // the fused path's threshold; STRASSENKIT_FUSED_STREAM_MB for A/B timing
  static const size_t b = [] {
    const char* v = std::getenv("STRASSENKIT_FUSED_STREAM_MB");
    return v ? size_t(std::atol(v)) << 20 : kStreamBytes;
  }();
  return b;
}

template <typename T>
inline void copy_out(T* dst, const T* src, int len, bool stream) {
#if defined(__AVX__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    int i = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; i + 8 <= len; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    } else {
      for (; i + 4 <= len; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
    }
    for (; i < len; ++i) dst[i] = src[i];
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, len * sizeof(T));
}

// 32 bytes from registers to memory, streamed (dst 32-byte aligned) or not
inline void store32(float* dst, v8f v, bool stream) {
#if defined(__AVX__)
  if (stream) {
    _mm256_stream_ps(dst, reinterpret_cast<__m256>(v));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, &v, sizeof(v));
}

// One vector to memory; streamed: dst aligned to the vector size (32 bytes with 64-byte vectors on CPUs
// without AVX-512, where the vector is stored as 32-byte halves).
template <typename T>
inline void store_vec(T* dst, vec_t<T> v, bool stream) {
#if defined(__AVX__)
  if (stream) {
#if defined(__AVX512F__)
    if constexpr (sizeof(v) == 64) {
      if constexpr (std::is_same_v<T, float>) {
        _mm512_stream_ps(dst, reinterpret_cast<__m512>(v));
      } else {
        _mm512_stream_pd(dst, reinterpret_cast<__m512d>(v));
      }
      return;
    }
#endif
    for (size_t h = 0; h < sizeof(v); h += 32) {
      if constexpr (std::is_same_v<T, float>) {
        _mm256_stream_ps(dst + h / sizeof(T), _mm256_loadu_ps(reinterpret_cast<const float*>(&v) + h / sizeof(T)));
      } else {
        _mm256_stream_pd(dst + h / sizeof(T), _mm256_loadu_pd(reinterpret_cast<const double*>(&v) + h / sizeof(T)));
      }
    }
    return;
  }
#endif
  (void)stream;
  vstore(dst, v);
}

inline void stream_fence(bool stream) {
#if defined(__AVX__)
  if (stream) _mm_sfence();
#endif
  (void)stream;
}

#ifdef STRASSENKIT_NO_PREFETCH  // for A/B timing only
constexpr bool kPrefetch = false;
#else
constexpr bool kPrefetch = true;
#endif

// Columns per chunk: 64 floats / 32 doubles -> 8 vectors; buffers stay in L1.
template <typename T>
constexpr int kChunk = 8 * Vec<T>::width;

// out[i*ldo + c] = sum_j A[i*lda + j] * B[j*ldb + c]   for i < RB, c < cols (cols % (2*width) == 0).
// kStream: streaming stores straight to the destination (out and ldo must keep 32-byte alignment).
template <typename T, int RB, bool kStream = false>
inline void micro_gemm(const T* A, int64_t lda, int J, const T* B, int64_t ldb, T* out, int64_t ldo, int cols) {
  constexpr int W = Vec<T>::width;
  for (int c = 0; c < cols; c += 2 * W) {
    vec_t<T> acc0[RB], acc1[RB];
    for (int i = 0; i < RB; ++i) {
      acc0[i] = vec_t<T>{};
      acc1[i] = vec_t<T>{};
    }
    for (int j = 0; j < J; ++j) {
      const vec_t<T> b0 = vload(B + j * ldb + c);
      const vec_t<T> b1 = vload(B + j * ldb + c + W);
      for (int i = 0; i < RB; ++i) {
        const T a = A[i * lda + j];
        acc0[i] += a * b0;
        acc1[i] += a * b1;
      }
    }
    for (int i = 0; i < RB; ++i) {
      store_vec(out + i * ldo + c, acc0[i], kStream);
      store_vec(out + i * ldo + c + W, acc1[i], kStream);
    }
  }
}

// out (R x cols, ld ldo) = A (R x J, row-major) @ B (J x cols, ld ldb). Columns in chunks of 8 vectors,
// all row blocks per chunk: the chunk of B (J rows) stays in L1 while every row block reads it (wider
// spans would re-read B from L2 once per row block).
template <typename T, bool kStream = false>
void small_gemm(const T* A, int R, int J, const T* B, int64_t ldb, T* out, int64_t ldo, int cols) {
  constexpr int CB = 8 * Vec<T>::width;
  for (int c0 = 0; c0 < cols; c0 += CB) {
    const int cc = std::min(CB, cols - c0);
    const T* Bc = B + c0;
    T* oc = out + c0;
    int i = 0;
    for (; i + 6 <= R; i += 6) micro_gemm<T, 6, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc);
    switch (R - i) {
      case 5: micro_gemm<T, 5, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc); break;
      case 4: micro_gemm<T, 4, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc); break;
      case 3: micro_gemm<T, 3, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc); break;
      case 2: micro_gemm<T, 2, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc); break;
      case 1: micro_gemm<T, 1, kStream>(A + i * J, J, J, Bc, ldb, oc + i * ldo, ldo, cc); break;
      default: break;
    }
  }
}

// acc[a*J + b] (vectors) += G[a*ldg + c] * X[b*ldx + c]   for a < LB, b < JB, c < cols (multiple of width).
// Accumulators stay vectors across calls; they are summed horizontally once at the end.
template <typename T, int LB, int JB>
inline void micro_dot(const T* G, int64_t ldg, const T* X, int64_t ldx, int cols, vec_t<T>* acc, int J) {
  constexpr int W = Vec<T>::width;
  vec_t<T> s[LB][JB];
  for (int a = 0; a < LB; ++a)
    for (int b = 0; b < JB; ++b) s[a][b] = acc[a * J + b];
  for (int c = 0; c < cols; c += W) {
    vec_t<T> g[LB];
    for (int a = 0; a < LB; ++a) g[a] = vload(G + a * ldg + c);
    for (int b = 0; b < JB; ++b) {  // one X vector at a time: LB*JB + LB + 1 registers
      const vec_t<T> xb = vload(X + b * ldx + c);
      for (int a = 0; a < LB; ++a) s[a][b] += g[a] * xb;
    }
  }
  for (int a = 0; a < LB; ++a)
    for (int b = 0; b < JB; ++b) acc[a * J + b] = s[a][b];
}

// acc (R x J vectors) += G (R x cols, ld ldg) @ X (J x cols, ld ldx)^T, lane-wise
template <typename T>
void small_gemm_nt(const T* G, int64_t ldg, int R, const T* X, int64_t ldx, int J, int cols, vec_t<T>* acc) {
  // 3 x 4 blocks: 12 accumulators + 3 G vectors + 1 X vector fill the 16 AVX registers exactly (a
  // 4 x 3 block needs 17 and spills); r = 24 and n*m = 16 split into them without remainder.
  auto row_block = [&](auto lb, int l) {
    constexpr int LB = decltype(lb)::value;
    int j = 0;
    for (; j + 4 <= J; j += 4) micro_dot<T, LB, 4>(G + l * ldg, ldg, X + j * ldx, ldx, cols, acc + l * J + j, J);
    for (; j < J; ++j) micro_dot<T, LB, 1>(G + l * ldg, ldg, X + j * ldx, ldx, cols, acc + l * J + j, J);
  };
  int l = 0;
#if defined(__AVX512F__)
  // 32 vector registers: 6 x 4 blocks (24 accumulators + 6 G + 1 X) read each X vector half as often
  for (; l + 6 <= R; l += 6) row_block(std::integral_constant<int, 6>{}, l);
#endif
  for (; l + 3 <= R; l += 3) row_block(std::integral_constant<int, 3>{}, l);
  for (; l < R; ++l) row_block(std::integral_constant<int, 1>{}, l);
}

// Work sharing. A static split (one slice per thread) waits for the slowest thread, and on a shared
// VM one vCPU is often stalled for milliseconds. Instead work is cut into more pieces than threads and
// every worker takes the next piece from a shared counter, so a stalled thread just takes fewer.
// Pieces have fixed boundaries, so per-piece partial results (and thus sums in piece order) do not
// depend on which thread ran them: results stay deterministic.
class WorkQueue {
 public:
  explicit WorkQueue(int64_t pieces) : pieces_(pieces) {}
  // Next piece index, or -1 when all have been handed out.
  int64_t take() {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    return i < pieces_ ? i : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t pieces_;
};

// Run worker() on up to `workers` threads of ATen's pool (inline when workers == 1). Each worker
// drains the shared WorkQueue it captured; worker-local buffers are set up once per call of worker().
// Worker threads start with default thread-local state: carry the caller's (below autograd inside the
// custom op, grad mode, ...) so that ATen ops on operands that require grad are legal there too.
template <typename F>
void run_workers(int64_t workers, const F& worker) {
  if (workers <= 1) {
    worker();
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t w = w0; w < w1; ++w) worker();
  });
}

// Chunk k of [0, chunks) cut into `pieces` slices: slice i is [chunks*i/pieces, chunks*(i+1)/pieces).
inline int64_t slice_begin(int64_t chunks, int64_t pieces, int64_t i) { return chunks * i / pieces; }

struct Split {
  int64_t workers, pieces;
};

// Workers: enough work per thread that the parallel region pays off (~256k multiply-adds minimum).
// Pieces: up to 8 per worker (dynamic balance), each still at least ~64k multiply-adds.
Split split_chunks(int64_t chunks, int64_t macs_per_chunk) {
  const int64_t threads = at::get_num_threads();
  const int64_t macs = chunks * macs_per_chunk;
  const int64_t workers = std::max<int64_t>(1, std::min({threads, chunks, macs / 262144}));
  if (workers == 1) return {1, 1};
  const int64_t pieces = std::max<int64_t>(workers, std::min({8 * workers, chunks, macs / 65536}));
  return {workers, pieces};
}

// Ask for transparent huge pages on a fresh output buffer before it is first touched: a large
// tensor is a fresh mmap, and faulting it in 4 KiB pages costs more than the encode itself.
void advise_huge(const at::Tensor& t) {
#ifdef __linux__
  static const bool enabled = [] {
    const char* v = std::getenv("STRASSENKIT_HUGEPAGES");
    return !(v && (v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F'));
  }();
  if (!enabled) return;
  const size_t bytes = t.nbytes();
  if (bytes < (size_t(8) << 20)) return;
  const uintptr_t page = uintptr_t(2) << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(t.data_ptr()) + page - 1) & ~(page - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(page - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory: errors ignored
#endif
}

// ------------------------------------------------------------------ a caching pool for the op's outputs
// PyTorch's CPU allocator does not cache: every large tensor is a fresh mmap that the kernel faults in
// (4 KiB pages unless THP_MEM_ALLOC_ENABLE=1) and zeroes on first touch, and unmaps when freed. An STL
// call allocates about 4x the bytes of a dense matmul (encoded activations, the r core products, the
// output; in training also their gradients), so it paid this most: at 4096^3 the faults were 10-20 %
// of the forward time, and erratic. Every tensor these kernels return (>= kPoolMinBytes) is therefore
// carved from this pool: 2 MiB-aligned anonymous mappings advised to use huge pages; when such a
// tensor is freed its block goes back to the pool (up to a cap on the bytes kept, STRASSENKIT_POOL_MB,
// default min(4 GiB, RAM/4); 0 = off) and the next request of the same size reuses it, already faulted
// in. This is what a caching allocator does, for the op's own tensors only: nothing process-wide
// changes. Results never depend on it (fresh blocks are zero, reused ones hold old values; every
// kernel writes its whole output). strassenkit.functional.native.pool_stats() / empty_pool().
// From 64 KiB: glibc serves such sizes from its heap but trims the heap's top after each free, so a
// layer's outputs were faulted in afresh on every call (3 fresh tensors of 0.5-0.8 MB cost 1.3 ms at
// d=128, 1024 rows: more than the layer's encode, core and decode together).
constexpr size_t kPoolMinBytes = size_t(64) << 10;
constexpr size_t kHuge = size_t(2) << 20;

bool hugepages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("STRASSENKIT_HUGEPAGES");
    return !(v && (v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F'));
  }();
  return enabled;
}

class Pool final : public c10::Allocator {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: tensors may be freed during interpreter shutdown
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
#ifdef __linux__
    if (n >= kPoolMinBytes && limit_.load(std::memory_order_relaxed) > 0) {
      const size_t size = n >= kHuge ? (n + kHuge - 1) / kHuge * kHuge : (n + 4095) / 4096 * 4096;
      void* ptr = nullptr;
      size_t got = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = free_.lower_bound(size);
        if (it != free_.end() && it->first <= size + size / 4) {  // best fit, at most 25 % larger
          ptr = it->second;
          got = it->first;
          cached_ -= got;
          free_.erase(it);
          ++hits_;
        }
      }
      if (!ptr) {
        ptr = map_fresh(size);
        got = size;
        std::lock_guard<std::mutex> lock(mu_);
        ++misses_;
      }
      if (ptr) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          live_[ptr] = got;
          in_use_ += got;
        }
        return {ptr, ptr, &Pool::release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* ptr) { get().put(ptr); }

  // cached bytes, bytes in use, hits, misses, limit
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_), int64_t(in_use_), hits_, misses_, int64_t(limit_.load())};
  }

  void set_limit(int64_t bytes) {
    limit_.store(size_t(std::max<int64_t>(0, bytes)));
    trim(limit_.load());
  }

  void trim(size_t keep) {  // unmap cached blocks until at most `keep` bytes stay cached
    std::vector<std::pair<size_t, void*>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (cached_ > keep && !free_.empty()) {
        auto it = std::prev(free_.end());  // largest first
        drop.emplace_back(it->first, it->second);
        cached_ -= it->first;
        free_.erase(it);
      }
    }
#ifdef __linux__
    for (auto& [size, ptr] : drop) munmap(ptr, size);
#endif
  }

 private:
  Pool() {
    size_t limit = size_t(4) << 30;
#ifdef __linux__
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) limit = std::min(limit, size_t(pages) * size_t(page) / 4);
#endif
    if (const char* v = std::getenv("STRASSENKIT_POOL_MB")) limit = size_t(std::max(0L, std::atol(v))) << 20;
    limit_.store(limit);
  }

  static void* map_fresh(size_t size) {
#ifdef __linux__
    const size_t align = size >= kHuge ? kHuge : 4096;
    void* raw = mmap(nullptr, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw) + align - 1) & ~(uintptr_t(align) - 1);
    const size_t head = a - reinterpret_cast<uintptr_t>(raw);
    if (head) munmap(raw, head);
    if (align - head) munmap(reinterpret_cast<void*>(a + size), align - head);
    if (size >= kHuge && hugepages_enabled()) madvise(reinterpret_cast<void*>(a), size, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(a);
#else
    (void)size;
    return nullptr;
#endif
  }

  void put(void* ptr) {
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      if (it == live_.end()) return;  // cannot happen: every block we hand out is in live_
      size = it->second;
      live_.erase(it);
      in_use_ -= size;
      if (cached_ + size <= limit_.load(std::memory_order_relaxed)) {
        free_.emplace(size, ptr);
        cached_ += size;
        return;
      }
    }
#ifdef __linux__
    munmap(ptr, size);
#endif
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;
  size_t cached_ = 0, in_use_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::atomic<size_t> limit_{0};
};

// at::empty from the pool (CPU, contiguous)
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_generic(sizes, &Pool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
}

// float, tile width 4: 8 consecutive tiles' columns <-> 4 vectors of 8 (one per column-in-tile v).
// deinterleave: a[0..3] = 32 floats [c0v0 c0v1 c0v2 c0v3 c1v0 ...]  ->  r[v] = [c0v .. c7v]
inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void deinterleave4(const float* src, float* dst0, int64_t ld) {
  using V8 = v8f;
  const V8 a0 = load8(src), a1 = load8(src + 8), a2 = load8(src + 16), a3 = load8(src + 24);
  const V8 s0 = __builtin_shufflevector(a0, a1, 0, 4, 8, 12, 1, 5, 9, 13);
  const V8 s1 = __builtin_shufflevector(a0, a1, 2, 6, 10, 14, 3, 7, 11, 15);
  const V8 s2 = __builtin_shufflevector(a2, a3, 0, 4, 8, 12, 1, 5, 9, 13);
  const V8 s3 = __builtin_shufflevector(a2, a3, 2, 6, 10, 14, 3, 7, 11, 15);
  store32(dst0, __builtin_shufflevector(s0, s2, 0, 1, 2, 3, 8, 9, 10, 11), false);
  store32(dst0 + ld, __builtin_shufflevector(s0, s2, 4, 5, 6, 7, 12, 13, 14, 15), false);
  store32(dst0 + 2 * ld, __builtin_shufflevector(s1, s3, 0, 1, 2, 3, 8, 9, 10, 11), false);
  store32(dst0 + 3 * ld, __builtin_shufflevector(s1, s3, 4, 5, 6, 7, 12, 13, 14, 15), false);
}
// the inverse: r[v] (4 rows of 8, stride ld) -> 32 interleaved floats
inline void interleave4(const float* src0, int64_t ld, float* dst, bool stream) {
  using V8 = v8f;
  const V8 r0 = load8(src0), r1 = load8(src0 + ld), r2 = load8(src0 + 2 * ld), r3 = load8(src0 + 3 * ld);
  const V8 s0 = __builtin_shufflevector(r0, r1, 0, 1, 2, 3, 8, 9, 10, 11);
  const V8 s1 = __builtin_shufflevector(r2, r3, 0, 1, 2, 3, 8, 9, 10, 11);
  const V8 s2 = __builtin_shufflevector(r0, r1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V8 s3 = __builtin_shufflevector(r2, r3, 4, 5, 6, 7, 12, 13, 14, 15);
  store32(dst, __builtin_shufflevector(s0, s1, 0, 4, 8, 12, 1, 5, 9, 13), stream);
  store32(dst + 8, __builtin_shufflevector(s0, s1, 2, 6, 10, 14, 3, 7, 11, 15), stream);
  store32(dst + 16, __builtin_shufflevector(s2, s3, 0, 4, 8, 12, 1, 5, 9, 13), stream);
  store32(dst + 24, __builtin_shufflevector(s2, s3, 2, 6, 10, 14, 3, 7, 11, 15), stream);
}

// Copy seg tiles (width w) of one row between the interleaved x layout and w planar rows (stride ld).
template <typename T>
inline void tiles_to_planes(const T* xr, int seg, int w, T* bu, int64_t ld) {
  int cc = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (w == 4)
      for (; cc + 8 <= seg; cc += 8) deinterleave4(xr + cc * 4, bu + cc, ld);
  }
  for (; cc < seg; ++cc)
    for (int v = 0; v < w; ++v) bu[v * ld + cc] = xr[cc * w + v];
}
template <typename T>
inline void planes_to_tiles(const T* ob, int64_t ld, int seg, int w, T* yr, bool stream) {
  int cc = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (w == 4) {
      const bool aligned = (reinterpret_cast<uintptr_t>(yr) & 31) == 0;
      for (; cc + 8 <= seg; cc += 8) interleave4(ob + cc, ld, yr + cc * 4, stream && aligned);
    }
  }
  for (; cc < seg; ++cc)
    for (int v = 0; v < w; ++v) yr[cc * w + v] = ob[v * ld + cc];
}

// Columns of the bmm layout are q = i*Ct + a (tile row i in [0, B*Mt), tile column a in [0, Ct)); for a
// fixed rank they are contiguous, so chunks of kChunk columns may span several tile rows.
struct TileGrid {
  int64_t M, C, Mt, Ct;  // matrix rows/cols of one sample, tile rows per sample, tile cols
  int n, w;              // tile height, tile width
};

// Walk the len columns from q0 in runs that stay inside one tile row: fn(c, seg, b, a, a0, inside) for
// chunk offset c, run length seg, sample b, tile row a of that sample, first tile column a0, and
// whether the run's columns all lie inside x (no right padding).
template <typename F>
inline void for_each_run(const TileGrid& g, int64_t q0, int len, const F& fn) {
  for (int c = 0; c < len;) {
    const int64_t q = q0 + c, i = q / g.Ct, a0 = q % g.Ct;
    const int seg = static_cast<int>(std::min<int64_t>(g.Ct - a0, len - c));
    fn(c, seg, i / g.Mt, i % g.Mt, a0, (a0 + seg) * g.w <= g.C);
    c += seg;
  }
}

// buf[(u*w+v)*CB + c] = x[b, a*n+u, (a0+c')*w+v] for the len columns from q0 (zero outside x), 0 up to cols
template <typename T>
void gather_tiles(const T* x, const TileGrid& g, int64_t q0, int len, int cols, T* buf, int64_t CB = kChunk<T>) {
  const int J = g.n * g.w;
  for_each_run(g, q0, len, [&](int c, int seg, int64_t b, int64_t a, int64_t a0, bool inside) {
    for (int u = 0; u < g.n; ++u) {
      const int64_t row = a * g.n + u;
      T* bu = buf + u * g.w * CB + c;
      if (row >= g.M) {
        for (int v = 0; v < g.w; ++v) std::fill(bu + v * CB, bu + v * CB + seg, T(0));
        continue;
      }
      const T* xr = x + (b * g.M + row) * g.C + a0 * g.w;
      if (inside) {
        tiles_to_planes(xr, seg, g.w, bu, CB);
      } else {
        const int64_t valid = g.C - a0 * g.w;
        for (int v = 0; v < g.w; ++v)
          for (int cc = 0; cc < seg; ++cc) {
            const int64_t col = static_cast<int64_t>(cc) * g.w + v;
            bu[v * CB + cc] = col < valid ? xr[col] : T(0);
          }
      }
    }
  });
  if (len < cols)
    for (int j = 0; j < J; ++j) std::fill(buf + j * CB + len, buf + j * CB + cols, T(0));
}

// Prefetch the x rows that gather_tiles will read for the chunk starting at column q (one tile row).
template <typename T>
inline void prefetch_tiles(const T* x, const TileGrid& g, int64_t q, int64_t Q) {
  if (!kPrefetch || q >= Q) return;
  constexpr int kLine = 64 / sizeof(T);
  const int64_t i = q / g.Ct, a0 = q % g.Ct, b = i / g.Mt, a = i % g.Mt;
  const int64_t c0 = a0 * g.w, c1 = std::min<int64_t>(g.C, c0 + int64_t(kChunk<T>) * g.w);
  for (int u = 0; u < g.n; ++u) {
    const int64_t row = a * g.n + u;
    if (row >= g.M) break;
    const T* xr = x + (b * g.M + row) * g.C;
    for (int64_t c = c0; c < c1; c += kLine) __builtin_prefetch(xr + c, 0, 0);
  }
}

// y[b, a*n+u, (a0+c')*w+v] = obuf[(u*w+v)*CB + c] for the len columns from q0 (skipping padding)
template <typename T>
void scatter_tiles(const T* obuf, const TileGrid& g, int64_t q0, int len, T* y, bool stream, int64_t CB = kChunk<T>) {
  for_each_run(g, q0, len, [&](int c, int seg, int64_t b, int64_t a, int64_t a0, bool inside) {
    for (int u = 0; u < g.n; ++u) {
      const int64_t row = a * g.n + u;
      if (row >= g.M) break;
      T* yr = y + (b * g.M + row) * g.C + a0 * g.w;
      const T* ob = obuf + u * g.w * CB + c;
      if (inside) {
        planes_to_tiles(ob, CB, seg, g.w, yr, stream);
      } else {
        const int64_t valid = g.C - a0 * g.w;
        for (int cc = 0; cc < seg; ++cc)
          for (int v = 0; v < g.w; ++v) {
            const int64_t col = static_cast<int64_t>(cc) * g.w + v;
            if (col < valid) yr[col] = ob[v * CB + cc];
          }
      }
    }
  });
}

template <typename T>
constexpr int round_cols(int len) {
  return (len + 2 * Vec<T>::width - 1) / (2 * Vec<T>::width) * (2 * Vec<T>::width);
}

// The r rows of one chunk in the bmm layout lie Q elements apart; Q*sizeof(T) is often a multiple
// of 4 KiB (e.g. 4 MiB at 4096^2), so they all map to the same L1/L2 cache sets and evict each other
// when a micro-kernel walks them repeatedly. Copy them once into / out of a contiguous L1 buffer.
// r strided streams are more than the hardware prefetchers track: prefetch `ahead` elements on
// (the chunk after next) by hand, every line of every row.
template <typename T>
inline void prefetch_rows(const T* src, int64_t Q, int rows, int64_t ahead) {
  constexpr int CB = kChunk<T>;
  constexpr int kLine = 64 / sizeof(T);
  if (kPrefetch && ahead > 0)
    for (int l = 0; l < rows; ++l)
      for (int c = 0; c < CB; c += kLine) __builtin_prefetch(src + l * Q + ahead + c, 0, 0);
}
template <typename T>
inline void load_rows(const T* src, int64_t Q, int rows, int len, int cols, T* buf, int64_t ahead = 0) {
  constexpr int CB = kChunk<T>;
  prefetch_rows(src, Q, rows, ahead);
  if (len == CB) {  // full chunk: fixed-size vector copies, no memcpy call per row
    constexpr int W = Vec<T>::width;
    for (int l = 0; l < rows; ++l)
      for (int c = 0; c < CB; c += W) vstore(buf + l * CB + c, vload(src + l * Q + c));
    return;
  }
  for (int l = 0; l < rows; ++l) {
    std::memcpy(buf + l * CB, src + l * Q, len * sizeof(T));
    std::fill(buf + l * CB + len, buf + l * CB + cols, T(0));
  }
}
template <typename T>
inline void store_rows(const T* buf, int rows, int len, T* dst, int64_t Q, bool stream) {
  constexpr int CB = kChunk<T>;
  for (int l = 0; l < rows; ++l) copy_out(dst + l * Q, buf + l * CB, len, stream);
}

// out[q] = the lanes of sum over pieces p of part[p*count + q], summed in piece order: deterministic for a
// given thread count, whichever thread ran a piece
template <typename T>
void sum_pieces(const std::vector<vec_t<T>>& part, int64_t pieces, int count, T* out) {
  for (int q = 0; q < count; ++q) {
    vec_t<T> s = vec_t<T>{};
    for (int64_t p = 0; p < pieces; ++p) s += part[p * count + q];
    T t = 0;
    for (int w = 0; w < Vec<T>::width; ++w) t += s[w];
    out[q] = t;
  }
}

template <typename T>
void encode_impl(const T* x, const TileGrid& g, int64_t B, const T* E, int r, T* out, const T* G, T* genc) {
  constexpr int CB = kChunk<T>;
  const int J = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;  // columns of the bmm layout; also the stride between ranks
  const int64_t chunks = (Q + CB - 1) / CB;
  const Split split = split_chunks(chunks, int64_t(CB) * r * J);
  std::vector<vec_t<T>> partial(genc ? split.pieces * r * J : 0, vec_t<T>{});  // one per piece
  const bool stream = out && size_t(r) * Q * sizeof(T) >= stream_bytes();
  // Rows Q apart stay 32-byte aligned (chunk starts are multiples of CB): no staging copy needed.
#if defined(__AVX512F__)
  constexpr size_t VA = sizeof(vec_t<T>);  // streamed vectors must be aligned to their size
#else
  constexpr size_t VA = 32;  // streamed in 32-byte halves
#endif
  const bool direct = stream && (Q * sizeof(T)) % VA == 0 && (reinterpret_cast<uintptr_t>(out) % VA) == 0;
  WorkQueue queue(split.pieces);
  run_workers(split.workers, [&] {
    std::vector<T> buf(J * CB), obuf(r * CB), gbuf(G ? r * CB : 0);
    for (int64_t i; (i = queue.take()) >= 0;) {
      vec_t<T>* acc = genc ? partial.data() + i * r * J : nullptr;
      const int64_t k1 = slice_begin(chunks, split.pieces, i + 1);
      for (int64_t k = slice_begin(chunks, split.pieces, i); k < k1; ++k) {
        const int64_t q0 = k * CB;
        const int len = static_cast<int>(std::min<int64_t>(CB, Q - q0));
        const int cols = round_cols<T>(len);
        if (k + 2 < k1) prefetch_tiles(x, g, q0 + 2 * CB, Q);
        gather_tiles(x, g, q0, len, cols, buf.data());
        if (out && direct && len == CB) {  // full chunk: stream the results straight from registers
          small_gemm<T, true>(E, r, J, buf.data(), CB, out + q0, Q, CB);
        } else if (out) {
          small_gemm(E, r, J, buf.data(), CB, obuf.data(), CB, cols);
          store_rows(obuf.data(), r, len, out + q0, Q, stream);
        }
        if (G && len == CB) {  // full chunk: read G in place (3 rows at a time do not thrash L1)
          prefetch_rows(G + q0, Q, r, k + 2 < k1 ? 2 * CB : 0);
          small_gemm_nt(G + q0, Q, r, buf.data(), CB, J, CB, acc);
        } else if (G) {
          load_rows(G + q0, Q, r, len, cols, gbuf.data(), k + 2 < k1 ? 2 * CB : 0);
          small_gemm_nt(gbuf.data(), CB, r, buf.data(), CB, J, cols, acc);
        }
      }
    }
    stream_fence(stream);
  });
  if (genc) sum_pieces(partial, split.pieces, r * J, genc);
}

template <typename T>
void add_bias_tiles(T* obuf, const TileGrid& g, int64_t q0, int len, const T* bias, int64_t ld);

// y = scatter(D @ P) (+ bias, added to each chunk in the cache before it is scattered: y + bias rounded once,
// the same values as y.add_(bias) afterwards)
template <typename T>
void decode_impl(const T* P, int r, const TileGrid& g, int64_t B, const T* D, T* y, const T* bias = nullptr) {
  constexpr int CB = kChunk<T>;
  const int R = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;
  const int64_t chunks = (Q + CB - 1) / CB;
  const bool stream = size_t(B) * g.M * g.C * sizeof(T) >= stream_bytes();
  const Split split = split_chunks(chunks, int64_t(CB) * r * R);
  WorkQueue queue(split.pieces);
  run_workers(split.workers, [&] {
    std::vector<T> buf(r * CB), obuf(R * CB);
    for (int64_t i; (i = queue.take()) >= 0;) {
      const int64_t k1 = slice_begin(chunks, split.pieces, i + 1);
      for (int64_t k = slice_begin(chunks, split.pieces, i); k < k1; ++k) {
        const int64_t q0 = k * CB;
        const int len = static_cast<int>(std::min<int64_t>(CB, Q - q0));
        const int cols = round_cols<T>(len);
        load_rows(P + q0, Q, r, len, cols, buf.data(), k + 2 < k1 ? 2 * CB : 0);
        small_gemm(D, R, r, buf.data(), CB, obuf.data(), CB, cols);
        if (bias) add_bias_tiles(obuf.data(), g, q0, len, bias, CB);
        scatter_tiles(obuf.data(), g, q0, len, y, stream);
      }
    }
    stream_fence(stream);
  });
}

// ------------------------------------------------------------------ fused path: encode, core, decode per row block
// For layers whose encoded weight is small (small widths, ViT/BERT-size blocks) the unfused stages are
// memory-bound: x_hat and the r core products are written by one pass and read back by the next (at
// d=128, 6400 rows: 25 MB per forward, 60 MB more in the backward), and the rate of every stage fell
// 2-4x below its in-cache rate. Here one worker takes a block of R consecutive tile rows and runs all
// stages on it while the block's encoded tiles and products stay in L2: gather + encode -> core (r
// small GEMMs by the register-blocked kernel below, straight from the weight) -> decode + scatter. The
// forward writes y (and, for the backward, x_hat and prod) once; the backward keeps the gradients of
// prod and x_hat in the block's scratch and accumulates the parameter gradients per piece of blocks.

// C[i, j] (= or +=) sum_k A(i, k) B[k*ldb + j] for i < RB, j < jvalid, k < Kd, with A(i, k) = A[i*lda + k]
// (TA = false) or A[k*lda + i] (TA = true). NV vectors of columns; B rows are read NV whole vectors wide
// (callers pad B, or give it slack: lanes past jvalid are computed and dropped).
template <typename T, int RB, int NV, bool TA>
inline void gemm_tile(const T* A, int64_t lda, int Kd, const T* B, int64_t ldb, T* C, int64_t ldc, int jvalid,
                      bool accumulate) {
  constexpr int W = Vec<T>::width;
  vec_t<T> acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec_t<T>{};
  for (int k = 0; k < Kd; ++k) {
    vec_t<T> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
    for (int i = 0; i < RB; ++i) {
      const T a = TA ? A[k * lda + i] : A[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  if (jvalid >= NV * W) {
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NV; ++v) {
        T* c = C + i * ldc + v * W;
        vstore(c, accumulate ? vload(c) + acc[i][v] : acc[i][v]);
      }
  } else {
    for (int i = 0; i < RB; ++i) {
      T tmp[NV * W];
      for (int v = 0; v < NV; ++v) vstore(tmp + v * W, acc[i][v]);
      T* c = C + i * ldc;
      for (int j = 0; j < jvalid; ++j) c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
    }
  }
}

template <typename T, int NV, bool TA>
inline void gemm_rows(const T* A, int64_t lda, int I, int Kd, const T* B, int64_t ldb, T* C, int64_t ldc, int jv,
                      bool accumulate) {
  // 6 rows x 2 vectors: 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 AVX registers
  auto a_at = [&](int i) { return TA ? A + i : A + int64_t(i) * lda; };
  // rows in blocks of 6; a remainder of 2 or 4 as 4-row blocks (I = 32: 4 x 6 + 2 x 4, not 5 x 6 + 2)
  const int fours = I >= 8 && I % 6 == 2 ? 2 : I % 6 == 4 ? 1 : 0;
  const int sixes_end = I - 4 * fours - (fours ? 0 : I % 6);
  int i = 0;
  for (; i < sixes_end; i += 6) gemm_tile<T, 6, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate);
  for (int f = 0; f < fours; ++f, i += 4)
    gemm_tile<T, 4, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate);
  switch (I - i) {
    case 5: gemm_tile<T, 5, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate); break;
    case 4: gemm_tile<T, 4, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate); break;
    case 3: gemm_tile<T, 3, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate); break;
    case 2: gemm_tile<T, 2, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate); break;
    case 1: gemm_tile<T, 1, NV, TA>(a_at(i), lda, Kd, B, ldb, C + i * ldc, ldc, jv, accumulate); break;
    default: break;
  }
}

// C (I x J, ld ldc) (= or +=) A (I x Kd; row-major with ld lda, or TA: stored Kd x I) @ B (Kd x J, ld ldb)
template <typename T, bool TA>
void gemm_small(const T* A, int64_t lda, int I, int Kd, const T* B, int64_t ldb, int J, T* C, int64_t ldc,
                bool accumulate) {
  constexpr int W = Vec<T>::width;
  constexpr int KB = 256;  // inner blocking: a 256 x 16 panel of B stays in L1
  if (Kd <= 0) {
    if (!accumulate)
      for (int i = 0; i < I; ++i) std::fill(C + i * ldc, C + i * ldc + J, T(0));
    return;
  }
  for (int k0 = 0; k0 < Kd; k0 += KB) {
    const int kd = std::min(KB, Kd - k0);
    const bool acc = accumulate || k0 > 0;
    const T* Ak = TA ? A + int64_t(k0) * lda : A + k0;
    const T* Bk = B + int64_t(k0) * ldb;
    for (int j = 0; j < J; j += 2 * W) {
      const int jv = std::min(2 * W, J - j);
      if (jv > W)
        gemm_rows<T, 2, TA>(Ak, lda, I, kd, Bk + j, ldb, C + j, ldc, jv, acc);
      else
        gemm_rows<T, 1, TA>(Ak, lda, I, kd, Bk + j, ldb, C + j, ldc, jv, acc);
    }
  }
}

// Row stride for scratch rows of n elements: room for the vector overrun of the kernels, 64-byte aligned,
// and an odd number of cache lines so that the r rows of a chunk do not all map to one L1 set.
template <typename T>
int64_t scratch_ld(int64_t n) {
  int64_t bytes = (n * int64_t(sizeof(T)) + 2 * int64_t(sizeof(vec_t<T>)) + 63) / 64 * 64;
  if ((bytes / 64) % 2 == 0) bytes += 64;
  return bytes / int64_t(sizeof(T));
}

// Per-thread scratch, 64-byte aligned, grown on demand and kept (one region per thread and call).
template <typename T>
T* thread_scratch(size_t n) {
  thread_local std::vector<char> mem;
  const size_t bytes = n * sizeof(T) + 64;
  if (mem.size() < bytes) mem.assign(bytes, 0);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(mem.data()) + 63) & ~uintptr_t(63));
}

// Scratch budget of one block (encoded tiles + products of R tile rows, all ranks). Tuned on the 2-core
// EPYC (AVX2, 512 KiB L2 per core); STRASSENKIT_FUSED_KB overrides it for A/B timing.
int64_t block_budget_bytes() {
  static const int64_t kb = [] {
    const char* v = std::getenv("STRASSENKIT_FUSED_KB");
    const long k = v ? std::atol(v) : 0;
    return k > 0 ? int64_t(k) : int64_t(512);
  }();
  return kb << 10;
}

// Stage timers for A/B work (strassenkit_native.fused_profile); off unless enabled.
std::atomic<bool> g_prof_on{false};
std::atomic<int64_t> g_prof[8];
struct StageTimer {  // thread CPU time: what a preempted thread did not run is not counted
  int64_t t0 = 0;
  bool on;
  static int64_t now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  }
  StageTimer() : on(g_prof_on.load(std::memory_order_relaxed)) { if (on) t0 = now(); }
  void lap(int k) {
    if (!on) return;
    const int64_t t = now();
    g_prof[k].fetch_add(t - t0, std::memory_order_relaxed);
    t0 = t;
  }
};

// Rows per block forced for A/B timing (strassenkit_native.fused_rows(R); 0 = the budget below).
std::atomic<int64_t> g_fused_rows{0};

template <typename T>
int64_t block_rows(int r, int64_t Kt, int64_t Nt, int64_t BMt) {
  const int64_t forced = g_fused_rows.load(std::memory_order_relaxed);
  if (forced > 0) return std::max<int64_t>(1, std::min(forced, BMt));
  const int64_t per_row = int64_t(r) * (Kt + Nt) * int64_t(sizeof(T));
  int64_t R = std::max<int64_t>(6, block_budget_bytes() / std::max<int64_t>(1, per_row));
  R = R >= 12 ? R / 12 * 12 : 6;  // whole 6-row kernel blocks
  return std::max<int64_t>(1, std::min(R, BMt));
}

// Columns are processed in spans of kSpan: long enough that the codec-gradient accumulators are loaded
// and stored once per span (not once per 64-column chunk), short enough that the span buffers (n*m or
// n*p rows) stay in L1/L2.
template <typename T>
constexpr int kSpan = 8 * kChunk<T>;

// Columns [q0, q1) of the bmm layout: gather tiles of x and (E) encode them into dst (column q at
// dst[l*ldd + q - q0]; dst rows need 2 vectors of slack), and/or (G) accumulate acc += G tiles^T with
// G's column q at G[l*ldg + q - q0]. buf: J x kSpan, gbuf: r x kChunk.
template <typename T>
void encode_cols(const T* x, const TileGrid& g, int64_t Q, int64_t q0, int64_t q1, const T* E, int r, T* dst,
                 int64_t ldd, const T* G, int64_t ldg, vec_t<T>* acc, T* buf, T* gbuf) {
  constexpr int CB = kChunk<T>, SP = kSpan<T>, W = Vec<T>::width;
  const int J = g.n * g.w;
  for (int64_t s0 = q0; s0 < q1; s0 += SP) {
    const int len = static_cast<int>(std::min<int64_t>(SP, q1 - s0));
    const int cols = round_cols<T>(len);
    for (int c = 0; c < len; c += CB) {
      if (s0 + c + 2 * CB < q1) prefetch_tiles(x, g, s0 + c + 2 * CB, Q);
      gather_tiles(x, g, s0 + c, std::min(CB, len - c), 0, buf + c, SP);
    }
    for (int j = 0; j < J; ++j) std::fill(buf + j * SP + len, buf + j * SP + cols, T(0));
    if (dst) small_gemm(E, r, J, buf, SP, dst + (s0 - q0), ldd, cols);
    if (G) {  // whole vectors in place, the ragged end through a zero-padded copy (0 * inf would be NaN)
      const int main = len / W * W;
      if (main) small_gemm_nt(G + (s0 - q0), ldg, r, buf, SP, J, main, acc);
      if (main < len) {
        for (int l = 0; l < r; ++l) {
          std::memcpy(gbuf + l * CB, G + l * ldg + (s0 - q0) + main, (len - main) * sizeof(T));
          std::fill(gbuf + l * CB + (len - main), gbuf + l * CB + W, T(0));
        }
        small_gemm_nt(gbuf, CB, r, buf + main, SP, J, W, acc);
      }
    }
  }
}

// obuf[(u*w+v)*ld + c] += bias[(a0+c')*w + v] for the len columns from q0 (bias has g.C entries)
template <typename T>
void add_bias_tiles(T* obuf, const TileGrid& g, int64_t q0, int len, const T* bias, int64_t ld) {
  for_each_run(g, q0, len, [&](int c, int seg, int64_t, int64_t, int64_t a0, bool) {
    for (int v = 0; v < g.w; ++v)
      for (int cc = 0; cc < seg; ++cc) {
        const int64_t col = (a0 + cc) * g.w + v;
        const T bv = col < g.C ? bias[col] : T(0);
        for (int u = 0; u < g.n; ++u) obuf[(u * g.w + v) * ld + c + cc] += bv;
      }
  });
}

// Columns [q0, q1): y tiles = D (R x r) @ P (+ bias), P's column q at P[l*ldp + q - q0] (rows need slack),
// scattered. obuf: R x kSpan.
template <typename T>
void decode_cols(const T* P, int64_t ldp, int r, const T* D, const TileGrid& g, int64_t q0, int64_t q1, T* y,
                 bool stream, T* obuf, const T* bias = nullptr) {
  constexpr int SP = kSpan<T>;
  const int R = g.n * g.w;
  for (int64_t s0 = q0; s0 < q1; s0 += SP) {
    const int len = static_cast<int>(std::min<int64_t>(SP, q1 - s0));
    small_gemm(D, R, r, P + (s0 - q0), ldp, obuf, SP, round_cols<T>(len));
    if (bias) add_bias_tiles(obuf, g, s0, len, bias, SP);
    scatter_tiles(obuf, g, s0, len, y, stream, SP);
  }
}

// B (r, Kd, J) contiguous -> the same with rows padded to a multiple of 2 vectors (zeros), or transposed
// (r, J, Kd) likewise; returns the row stride. Without padding or transposition B itself is used.
template <typename T>
const T* pack_weight(const T* w, int r, int64_t rows, int64_t cols, bool transpose, std::vector<T>& store_unused,
                     int64_t& ld) {
  (void)store_unused;
  constexpr int W2 = 2 * Vec<T>::width;
  const int64_t out_rows = transpose ? cols : rows, out_cols = transpose ? rows : cols;
  ld = (out_cols + W2 - 1) / W2 * W2;
  if (!transpose && ld == cols) return w;
  thread_local std::vector<T> store;  // kept per calling thread: no fresh pages per call
  store.resize(size_t(r) * out_rows * ld);
  std::fill(store.begin(), store.end(), T(0));
  for (int l = 0; l < r; ++l) {
    const T* src = w + int64_t(l) * rows * cols;
    T* dst = store.data() + int64_t(l) * out_rows * ld;
    if (transpose) {
      for (int64_t a = 0; a < rows; ++a)
        for (int64_t b = 0; b < cols; ++b) dst[b * ld + a] = src[a * cols + b];
    } else {
      for (int64_t a = 0; a < rows; ++a) std::memcpy(dst + a * ld, src + a * cols, cols * sizeof(T));
    }
  }
  return store.data();
}

template <typename T>
void fused_forward_impl(const T* x, const TileGrid& gx, const TileGrid& gy, int64_t B, const T* E, int r, const T* Wp,
                        int64_t ldw, const T* D, T* y, T* xh_out, T* prod_out, const T* bias) {
  constexpr int CB = kChunk<T>;
  const int J = gx.n * gx.w, Ro = gy.n * gy.w;
  const int64_t BMt = B * gx.Mt, Kt = gx.Ct, Nt = gy.Ct;
  const int64_t R = block_rows<T>(r, Kt, Nt, BMt);
  const int64_t blocks = (BMt + R - 1) / R;
  const int64_t ldx = scratch_ld<T>(R * Kt), ldp = scratch_ld<T>(R * Nt);
  const bool stream_y = size_t(B) * gy.M * gy.C * sizeof(T) >= fused_stream_bytes();
  const bool stream_saved = size_t(r) * BMt * Nt * sizeof(T) >= fused_stream_bytes();
  const int64_t macs = BMt * r * (Kt * J + Kt * Nt + Nt * Ro);
  const int64_t threads = at::get_num_threads();
  const int64_t workers = std::max<int64_t>(1, std::min({threads, blocks, macs / 262144}));
  WorkQueue queue(blocks);
  run_workers(workers, [&] {
    T* xs = thread_scratch<T>(size_t(r) * (ldx + ldp) + size_t(J + Ro) * kSpan<T>);
    T* ps = xs + r * ldx;
    T* buf = ps + r * ldp;
    T* obuf = buf + J * kSpan<T>;
    for (int64_t b; (b = queue.take()) >= 0;) {
      const int64_t i0 = b * R, i1 = std::min(BMt, i0 + R);
      const int rows = static_cast<int>(i1 - i0);
      StageTimer tm;
      encode_cols(x, gx, BMt * Kt, i0 * Kt, i1 * Kt, E, r, xs, ldx, static_cast<const T*>(nullptr), 0,
                  static_cast<vec_t<T>*>(nullptr), buf, static_cast<T*>(nullptr));
      tm.lap(0);
      for (int l = 0; l < r; ++l)
        gemm_small<T, false>(xs + l * ldx, Kt, rows, static_cast<int>(Kt), Wp + l * Kt * ldw, ldw, static_cast<int>(Nt),
                             ps + l * ldp, Nt, false);
      tm.lap(1);
      decode_cols(ps, ldp, r, D, gy, i0 * Nt, i1 * Nt, y, stream_y, obuf, bias);
      tm.lap(2);
      for (int l = 0; xh_out && l < r; ++l)
        copy_out(xh_out + l * BMt * Kt + i0 * Kt, xs + l * ldx, static_cast<int>(rows * Kt), stream_saved);
      for (int l = 0; prod_out && l < r; ++l)
        copy_out(prod_out + l * BMt * Nt + i0 * Nt, ps + l * ldp, static_cast<int>(rows * Nt), stream_saved);
    }
    stream_fence(stream_y || stream_saved);
  });
}

// Gradients of the fused forward. gy (B, M, N); Et = dec^T (r, n*p); WT: w_hat^T padded (r, Nt, ldwt);
// Ed = enc^T (n*m, r); xh, prod: the saved (r, B*Mt, Kt), (r, B*Mt, Nt). Outputs (null = not wanted):
// gx (B, M, K), gw (r, Kt, Nt), genc (r, n*m), gdecT: the decoder gradient, written as (n*p, r). Parameter gradients are summed per
// piece (fixed ranges of blocks) and then in piece order: bitwise reproducible for a thread count.
template <typename T>
void fused_backward_impl(const T* gyp, const TileGrid& gyg, const T* x, const TileGrid& gxg, int64_t B, const T* Et,
                         int r, const T* WT, int64_t ldwt, const T* Ed, const T* xh, const T* prod, T* gx, T* gw,
                         T* genc, T* gdecT) {
  constexpr int CB = kChunk<T>;
  const int Jy = gyg.n * gyg.w, Jx = gxg.n * gxg.w;
  const int64_t BMt = B * gxg.Mt, Kt = gxg.Ct, Nt = gyg.Ct;
  const int64_t R = block_rows<T>(r, Kt, Nt, BMt);
  const int64_t blocks = (BMt + R - 1) / R;
  const int64_t ldx = scratch_ld<T>(R * Kt), ldp = scratch_ld<T>(R * Nt);
  const bool stream_x = size_t(B) * gxg.M * gxg.C * sizeof(T) >= fused_stream_bytes();
  const bool need_xh = gx || genc;
  const int64_t macs = BMt * r * (2 * Nt * Jy + 2 * Kt * Nt + Kt * 2 * Jx);
  const int64_t threads = at::get_num_threads();
  const int64_t workers = std::max<int64_t>(1, std::min({threads, blocks, macs / 262144}));
  const int64_t pieces = workers == 1 ? 1 : std::min(blocks, 2 * workers);
  const int64_t wsize = int64_t(r) * Kt * Nt;
  std::vector<T> gw_part(gw && pieces > 1 ? size_t(pieces) * wsize : 0, T(0));
  if (gw) std::fill(gw, gw + wsize, T(0));
  std::vector<vec_t<T>> dec_part(gdecT ? size_t(pieces) * r * Jy : 0, vec_t<T>{});
  std::vector<vec_t<T>> enc_part(genc ? size_t(pieces) * r * Jx : 0, vec_t<T>{});
  WorkQueue queue(pieces);
  run_workers(workers, [&] {
    const int Jm = std::max(Jx, Jy);
    T* gps = thread_scratch<T>(size_t(r) * (ldx + ldp) + size_t(Jm + Jm) * kSpan<T> + size_t(r) * CB);
    T* gxs = gps + r * ldp;
    T* buf = gxs + r * ldx;
    T* obuf = buf + Jm * kSpan<T>;
    T* gbuf = obuf + Jm * kSpan<T>;
    for (int64_t p; (p = queue.take()) >= 0;) {
      T* gwp = gw ? (pieces > 1 ? gw_part.data() + p * wsize : gw) : nullptr;
      vec_t<T>* dacc = gdecT ? dec_part.data() + p * r * Jy : nullptr;
      vec_t<T>* eacc = genc ? enc_part.data() + p * r * Jx : nullptr;
      const int64_t b1 = slice_begin(blocks, pieces, p + 1);
      for (int64_t b = slice_begin(blocks, pieces, p); b < b1; ++b) {
        const int64_t i0 = b * R, i1 = std::min(BMt, i0 + R);
        const int rows = static_cast<int>(i1 - i0);
        // g_prod = dec^T-encode of gy; grad dec^T += prod x gy tiles^T
        StageTimer tm;
        encode_cols(gyp, gyg, BMt * Nt, i0 * Nt, i1 * Nt, Et, r, gps, ldp, gdecT ? prod + i0 * Nt : nullptr, BMt * Nt,
                    dacc, buf, gbuf);
        tm.lap(3);
        for (int l = 0; gw && l < r; ++l)  // grad w_hat[l] += x_hat[l]^T g_prod[l]
          gemm_small<T, true>(xh + l * BMt * Kt + i0 * Kt, Kt, static_cast<int>(Kt), rows, gps + l * ldp, Nt,
                              static_cast<int>(Nt), gwp + l * Kt * Nt, Nt, true);
        tm.lap(4);
        if (!need_xh) continue;
        for (int l = 0; l < r; ++l)  // g_xhat[l] = g_prod[l] w_hat[l]^T
          gemm_small<T, false>(gps + l * ldp, Nt, rows, static_cast<int>(Nt), WT + l * Nt * ldwt, ldwt,
                               static_cast<int>(Kt), gxs + l * ldx, Kt, false);
        tm.lap(5);
        if (gx) decode_cols(gxs, ldx, r, Ed, gxg, i0 * Kt, i1 * Kt, gx, stream_x, obuf);
        tm.lap(6);
        if (genc)
          encode_cols(x, gxg, BMt * Kt, i0 * Kt, i1 * Kt, static_cast<const T*>(nullptr), r, static_cast<T*>(nullptr),
                      0, gxs, ldx, eacc, buf, gbuf);
        tm.lap(7);
      }
    }
    stream_fence(stream_x);
  });
  if (gw && pieces > 1) {
    for (int64_t p = 0; p < pieces; ++p) {
      const T* src = gw_part.data() + p * wsize;
      for (int64_t q = 0; q < wsize; ++q) gw[q] += src[q];
    }
  }
  // entry q = l*Jn + j goes to out[q], or to out[j*r + l] when transposed (the decoder gradient is (n*p, r))
  auto finish = [&](const std::vector<vec_t<T>>& part, int Jn, T* out, bool transposed) {
    for (int q = 0; q < r * Jn; ++q) {
      vec_t<T> s = vec_t<T>{};
      for (int64_t p = 0; p < pieces; ++p) s += part[p * r * Jn + q];
      T t = 0;
      for (int w = 0; w < Vec<T>::width; ++w) t += s[w];
      out[transposed ? (q % Jn) * r + q / Jn : q] = t;
    }
  };
  if (genc) finish(enc_part, Jx, genc, false);
  if (gdecT) finish(dec_part, Jy, gdecT, true);
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "strassenkit_native: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "strassenkit_native: ", name, " must be float32 or float64, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> encode(const at::Tensor& x_, const at::Tensor& enc_, int64_t n, int64_t m,
                                          int64_t Mt, int64_t Kt, bool want_out, const at::Tensor& G_) {
  check_float(x_, "x");
  TORCH_CHECK(x_.dim() == 3, "strassenkit_native.encode: x must be (B, M, K)");
  TORCH_CHECK(enc_.dim() == 2 && enc_.size(1) == n * m, "strassenkit_native.encode: enc must be (r, n*m)");
  TORCH_CHECK(enc_.scalar_type() == x_.scalar_type(), "strassenkit_native.encode: dtype mismatch");
  const auto x = x_.contiguous();
  const auto enc = enc_.contiguous();
  const int64_t B = x.size(0), M = x.size(1), K = x.size(2), r = enc.size(0);
  TORCH_CHECK(Mt * n >= M && Kt * m >= K, "strassenkit_native.encode: Mt/Kt too small");
  const bool want_grad = G_.numel() > 0;
  at::Tensor G;
  if (want_grad) {
    TORCH_CHECK(G_.sizes() == at::IntArrayRef({r, B * Mt, Kt}) && G_.scalar_type() == x.scalar_type(),
                "strassenkit_native.encode: G must be (r, B*Mt, Kt) in x's dtype");
    G = G_.contiguous();
  }
  at::Tensor out = want_out ? pooled_empty({r, B * Mt, Kt}, x.options()) : at::empty({0}, x.options());
  at::Tensor genc = want_grad ? at::empty({r, n * m}, x.options()) : at::empty({0}, x.options());
  if (want_out) advise_huge(out);
  const TileGrid grid{M, K, Mt, Kt, static_cast<int>(n), static_cast<int>(m)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "strassenkit_native.encode", [&] {
    encode_impl<scalar_t>(x.data_ptr<scalar_t>(), grid, B, enc.data_ptr<scalar_t>(), r,
                          want_out ? out.data_ptr<scalar_t>() : nullptr, want_grad ? G.data_ptr<scalar_t>() : nullptr,
                          want_grad ? genc.data_ptr<scalar_t>() : nullptr);
  });
  return {out, genc};
}

at::Tensor decode(const at::Tensor& P_, const at::Tensor& dec_, int64_t n, int64_t p, int64_t B, int64_t Mt,
                  int64_t M, int64_t N, const std::optional<at::Tensor>& bias_) {
  check_float(P_, "P");
  TORCH_CHECK(P_.dim() == 3 && P_.size(1) == B * Mt, "strassenkit_native.decode: P must be (r, B*Mt, Nt)");
  TORCH_CHECK(dec_.dim() == 2 && dec_.size(0) == n * p && dec_.size(1) == P_.size(0),
              "strassenkit_native.decode: dec must be (n*p, r)");
  TORCH_CHECK(dec_.scalar_type() == P_.scalar_type(), "strassenkit_native.decode: dtype mismatch");
  TORCH_CHECK(Mt * n >= M && P_.size(2) * p >= N, "strassenkit_native.decode: M/N too large");
  const auto P = P_.contiguous();
  const auto D = dec_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N, "strassenkit_native.decode: bias must be (N,)");
    TORCH_CHECK(bias_->scalar_type() == P_.scalar_type() && bias_->device().is_cpu(),
                "strassenkit_native.decode: bias must be a CPU tensor of P's dtype");
    bias = bias_->contiguous();
  }
  at::Tensor y = pooled_empty({B, M, N}, P.options());
  advise_huge(y);
  const TileGrid grid{M, N, Mt, P.size(2), static_cast<int>(n), static_cast<int>(p)};
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "strassenkit_native.decode", [&] {
    decode_impl<scalar_t>(P.data_ptr<scalar_t>(), P.size(0), grid, B, D.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr);
  });
  return y;
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "strassenkit_native.bmm: shapes (r,X,Y) @ (r,Y,Z) expected");
  const int64_t r = a.size(0);
  at::Tensor out = pooled_empty({r, a.size(1), b.size(2)}, a.options());
  advise_huge(out);
  // Pieces are whole GEMMs (rank l), or row blocks of them when r alone would leave threads idle at
  // the end (e.g. r = 7 on 2 threads: 14 half GEMMs); a worker takes the next piece when done. Each
  // GEMM runs inside the parallel region, where ATen/MKL use a single thread.
  const int64_t threads = at::get_num_threads(), X = a.size(1);
  const int64_t rows_split = std::clamp<int64_t>((4 * threads + r - 1) / r, 1, std::max<int64_t>(1, X / 64));
  const int64_t pieces = r * rows_split;
  WorkQueue queue(pieces);
  run_workers(std::min(threads, pieces), [&] {
    for (int64_t i; (i = queue.take()) >= 0;) {
      const int64_t l = i / rows_split, part = i % rows_split;
      const int64_t x0 = X * part / rows_split, x1 = X * (part + 1) / rows_split;
      auto o = out.select(0, l).slice(0, x0, x1);
      at::mm_out(o, a.select(0, l).slice(0, x0, x1), b.select(0, l));
    }
  });
  return out;
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "strassenkit_native: ", name, " dtype mismatch");
  TORCH_CHECK(b.device().is_cpu(), "strassenkit_native: ", name, " must be a CPU tensor");
}

// fused_forward(x (B,M,K), w_hat (r,Kt,Nt), enc (r,n*m), dec (n*p,r), n, m, p, N, save)
//   -> y (B,M,N), x_hat (r,B*Mt,Kt) and prod (r,B*Mt,Nt) when save, else empty
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& enc_,
                                                             const at::Tensor& dec_, int64_t n, int64_t m, int64_t p,
                                                             int64_t N, bool save, const std::optional<at::Tensor>& bias_) {
  check_float(x_, "x");
  check_same(x_, w_, "w_hat");
  check_same(x_, enc_, "enc");
  check_same(x_, dec_, "dec");
  TORCH_CHECK(x_.dim() == 3 && w_.dim() == 3, "strassenkit_native.fused_forward: x (B,M,K) and w_hat (r,Kt,Nt) expected");
  const int64_t B = x_.size(0), M = x_.size(1), K = x_.size(2), r = w_.size(0), Kt = w_.size(1), Nt = w_.size(2);
  TORCH_CHECK(enc_.dim() == 2 && enc_.size(0) == r && enc_.size(1) == n * m, "strassenkit_native.fused_forward: enc must be (r, n*m)");
  TORCH_CHECK(dec_.dim() == 2 && dec_.size(0) == n * p && dec_.size(1) == r, "strassenkit_native.fused_forward: dec must be (n*p, r)");
  TORCH_CHECK(Kt * m >= K && (Kt - 1) * m < K + m && Nt * p >= N && N > (Nt - 1) * p, "strassenkit_native.fused_forward: tile counts");
  const auto x = x_.contiguous(), w = w_.contiguous(), enc = enc_.contiguous(), dec = dec_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_same(x_, *bias_, "bias");
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N, "strassenkit_native.fused_forward: bias must be (N,)");
    bias = bias_->contiguous();
  }
  const int64_t Mt = (M + n - 1) / n;
  at::Tensor y = pooled_empty({B, M, N}, x.options());
  at::Tensor xh = save ? pooled_empty({r, B * Mt, Kt}, x.options()) : at::empty({0}, x.options());
  at::Tensor prod = save ? pooled_empty({r, B * Mt, Nt}, x.options()) : at::empty({0}, x.options());
  if (B * M == 0 || K == 0) {  // nothing to multiply: zeros (+ bias), like x @ w
    y.zero_();
    if (bias.defined()) y.add_(bias);
    if (save) {
      xh.zero_();
      prod.zero_();
    }
    return {y, xh, prod};
  }
  const TileGrid gx{M, K, Mt, Kt, static_cast<int>(n), static_cast<int>(m)};
  const TileGrid gy{M, N, Mt, Nt, static_cast<int>(n), static_cast<int>(p)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "strassenkit_native.fused_forward", [&] {
    std::vector<scalar_t> store;
    int64_t ldw = 0;
    const scalar_t* Wp = pack_weight(w.data_ptr<scalar_t>(), static_cast<int>(r), Kt, Nt, false, store, ldw);
    fused_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), gx, gy, B, enc.data_ptr<scalar_t>(), static_cast<int>(r), Wp, ldw,
                                 dec.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                 save ? xh.data_ptr<scalar_t>() : nullptr, save ? prod.data_ptr<scalar_t>() : nullptr,
                                 bias.defined() ? bias.data_ptr<scalar_t>() : nullptr);
  });
  return {y, xh, prod};
}

// fused_backward(gy (B,M,N), x, w_hat, enc, dec, x_hat, prod, n, m, p, need_x, need_w, need_enc, need_dec)
//   -> (grad x (B,M,K), grad w_hat (r,Kt,Nt), grad enc (r,n*m), grad dec (n*p,r)); empty where not needed
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& gy_, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& enc_, const at::Tensor& dec_,
    const at::Tensor& xh_, const at::Tensor& prod_, int64_t n, int64_t m, int64_t p, bool need_x, bool need_w,
    bool need_e, bool need_d) {
  check_float(x_, "x");
  for (const auto* t : {&gy_, &w_, &enc_, &dec_, &xh_, &prod_}) check_same(x_, *t, "operand");
  const int64_t B = x_.size(0), M = x_.size(1), K = x_.size(2), r = w_.size(0), Kt = w_.size(1), Nt = w_.size(2);
  const int64_t N = gy_.size(2), Mt = (M + n - 1) / n;
  TORCH_CHECK(gy_.dim() == 3 && gy_.size(0) == B && gy_.size(1) == M, "strassenkit_native.fused_backward: gy must be (B, M, N)");
  TORCH_CHECK(xh_.sizes() == at::IntArrayRef({r, B * Mt, Kt}) && prod_.sizes() == at::IntArrayRef({r, B * Mt, Nt}),
              "strassenkit_native.fused_backward: x_hat/prod shapes");
  TORCH_CHECK(enc_.sizes() == at::IntArrayRef({r, n * m}) && dec_.sizes() == at::IntArrayRef({n * p, r}),
              "strassenkit_native.fused_backward: enc/dec shapes");
  const auto gy = gy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), xh = xh_.contiguous(), prod = prod_.contiguous();
  const auto dec = dec_.contiguous(), enc = enc_.contiguous();
  const auto opt = x.options();
  at::Tensor gx = need_x ? pooled_empty({B, M, K}, opt) : at::empty({0}, opt);
  at::Tensor gw = need_w ? pooled_empty({r, Kt, Nt}, opt) : at::empty({0}, opt);
  at::Tensor genc = need_e ? at::empty({r, n * m}, opt) : at::empty({0}, opt);
  at::Tensor gdecT = need_d ? at::empty({n * p, r}, opt) : at::empty({0}, opt);  // filled transposed
  if (B * M == 0) {
    for (auto* t : {&gw, &genc, &gdecT}) if (t->numel()) t->zero_();
    return {gx, gw, genc, gdecT};
  }
  const TileGrid gxg{M, K, Mt, Kt, static_cast<int>(n), static_cast<int>(m)};
  const TileGrid gyg{M, N, Mt, Nt, static_cast<int>(n), static_cast<int>(p)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "strassenkit_native.fused_backward", [&] {
    std::vector<scalar_t> store, et(r * n * p), ed(n * m * r);  // dec^T, enc^T (tiny; ATen ops cost more)
    const scalar_t *D = dec.data_ptr<scalar_t>(), *E = enc.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n * p; ++i)
      for (int64_t l = 0; l < r; ++l) et[l * n * p + i] = D[i * r + l];
    for (int64_t l = 0; l < r; ++l)
      for (int64_t j = 0; j < n * m; ++j) ed[j * r + l] = E[l * n * m + j];
    int64_t ldwt = 0;
    const scalar_t* WT = (need_x || need_e) ? pack_weight(w.data_ptr<scalar_t>(), static_cast<int>(r), Kt, Nt, true, store, ldwt)
                                           : nullptr;
    auto ptr = [](at::Tensor& t, bool want) { return want ? t.data_ptr<scalar_t>() : nullptr; };
    fused_backward_impl<scalar_t>(gy.data_ptr<scalar_t>(), gyg, x.data_ptr<scalar_t>(), gxg, B, et.data(),
                                  static_cast<int>(r), WT, ldwt, ed.data(), xh.data_ptr<scalar_t>(),
                                  prod.data_ptr<scalar_t>(), ptr(gx, need_x), ptr(gw, need_w), ptr(genc, need_e),
                                  ptr(gdecT, need_d));
  });
  return {gx, gw, genc, gdecT};
}

// ------------------------------------------------------------------ bfloat16 storage, float32 arithmetic
// encode_bf16 / decode_bf16: the unfused encode and decode of bf16 tensors (CPUs whose bf16 GEMMs are native:
// the core bmm stays bf16). Values are widened to float32 as the tiles are gathered (exact), the small GEMMs
// run in float32 and the results are rounded to bf16 once as they are stored (round to nearest even, as
// c10::BFloat16 does; a NaN stays a quiet NaN). Without them the bf16 fast path runs these stages as
// PyTorch ops (a permute-copy, a bf16 GEMM with a tiny inner dimension, another permute-copy).
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Widen / round a contiguous run (vectorizes: shifts and integer adds)
inline void widen_bf16(const uint16_t* src, int len, float* dst) {
  for (int i = 0; i < len; ++i) dst[i] = bf16_to_f32(src[i]);
}
inline void round_bf16(const float* src, int len, uint16_t* dst) {
  for (int i = 0; i < len; ++i) dst[i] = f32_to_bf16(src[i]);
}

// buf[(u*w+v)*CB + c] = x[b, a*n+u, (a0+c')*w+v] (as float) for the len columns from q0, zero outside x and up
// to cols: each row's run is widened into row (seg*w floats, zero past x), then split into planes like float x
void gather_tiles_bf16(const uint16_t* x, const TileGrid& g, int64_t q0, int len, int cols, float* buf, int64_t CB,
                       float* row) {
  const int J = g.n * g.w;
  for_each_run(g, q0, len, [&](int c, int seg, int64_t b, int64_t a, int64_t a0, bool) {
    const int valid = static_cast<int>(std::min<int64_t>(int64_t(seg) * g.w, g.C - a0 * g.w));
    for (int u = 0; u < g.n; ++u) {
      const int64_t r_ = a * g.n + u;
      float* bu = buf + u * g.w * CB + c;
      if (r_ >= g.M) {
        for (int v = 0; v < g.w; ++v) std::fill(bu + v * CB, bu + v * CB + seg, 0.f);
        continue;
      }
      widen_bf16(x + (b * g.M + r_) * g.C + a0 * g.w, valid, row);
      std::fill(row + valid, row + seg * g.w, 0.f);
      tiles_to_planes(row, seg, g.w, bu, CB);
    }
  });
  if (len < cols)
    for (int j = 0; j < J; ++j) std::fill(buf + j * CB + len, buf + j * CB + cols, 0.f);
}

// out (E-encoded tiles, bf16) and/or genc += G tiles^T (G bf16, genc float32 (r, J)), as encode_impl does
void encode_bf16_impl(const uint16_t* x, const TileGrid& g, int64_t B, const float* E, int r, uint16_t* out,
                      const uint16_t* G, float* genc) {
  using V = vec_t<float>;
  constexpr int CB = kChunk<float>;
  const int J = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;
  const int64_t chunks = (Q + CB - 1) / CB;
  const Split split = split_chunks(chunks, int64_t(CB) * r * J);
  std::vector<V> partial(genc ? split.pieces * r * J : 0, V{});  // one per piece: a deterministic sum
  WorkQueue queue(split.pieces);
  run_workers(split.workers, [&] {
    std::vector<float> buf(J * CB), obuf(out ? r * CB : 0), row(CB * g.w), gbuf(G ? r * CB : 0);
    for (int64_t i; (i = queue.take()) >= 0;) {
      V* acc = genc ? partial.data() + i * r * J : nullptr;
      const int64_t k1 = slice_begin(chunks, split.pieces, i + 1);
      for (int64_t k = slice_begin(chunks, split.pieces, i); k < k1; ++k) {
        const int64_t q0 = k * CB;
        const int len = static_cast<int>(std::min<int64_t>(CB, Q - q0));
        const int cols = round_cols<float>(len);
        gather_tiles_bf16(x, g, q0, len, cols, buf.data(), CB, row.data());
        if (out) {
          small_gemm(E, r, J, buf.data(), CB, obuf.data(), CB, cols);
          for (int l = 0; l < r; ++l) round_bf16(obuf.data() + l * CB, len, out + l * Q + q0);
        }
        if (G) {  // widened rows, zero past len (buf is zero there too: no 0 * inf)
          for (int l = 0; l < r; ++l) {
            float* d = gbuf.data() + l * CB;
            widen_bf16(G + l * Q + q0, len, d);
            std::fill(d + len, d + cols, 0.f);
          }
          small_gemm_nt(gbuf.data(), CB, r, buf.data(), CB, J, cols, acc);
        }
      }
    }
  });
  if (genc) sum_pieces(partial, split.pieces, r * J, genc);
}

void decode_bf16_impl(const uint16_t* P, int r, const TileGrid& g, int64_t B, const float* D, uint16_t* y,
                      const float* bias) {
  constexpr int CB = kChunk<float>;
  const int R = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;
  const int64_t chunks = (Q + CB - 1) / CB;
  const Split split = split_chunks(chunks, int64_t(CB) * r * R);
  WorkQueue queue(split.pieces);
  run_workers(split.workers, [&] {
    std::vector<float> buf(r * CB), obuf(R * CB), row(CB * g.w);
    for (int64_t i; (i = queue.take()) >= 0;) {
      const int64_t k1 = slice_begin(chunks, split.pieces, i + 1);
      for (int64_t k = slice_begin(chunks, split.pieces, i); k < k1; ++k) {
        const int64_t q0 = k * CB;
        const int len = static_cast<int>(std::min<int64_t>(CB, Q - q0));
        const int cols = round_cols<float>(len);
        for (int l = 0; l < r; ++l) {
          float* d = buf.data() + l * CB;
          widen_bf16(P + l * Q + q0, len, d);
          std::fill(d + len, d + cols, 0.f);
        }
        small_gemm(D, R, r, buf.data(), CB, obuf.data(), CB, cols);
        if (bias) add_bias_tiles(obuf.data(), g, q0, len, bias, CB);
        for_each_run(g, q0, len, [&](int c, int seg, int64_t b, int64_t a, int64_t a0, bool) {
          const int valid = static_cast<int>(std::min<int64_t>(int64_t(seg) * g.w, g.C - a0 * g.w));
          for (int u = 0; u < g.n; ++u) {
            const int64_t r_ = a * g.n + u;
            if (r_ >= g.M) break;
            planes_to_tiles(obuf.data() + u * g.w * CB + c, CB, seg, g.w, row.data(), false);
            round_bf16(row.data(), valid, y + (b * g.M + r_) * g.C + a0 * g.w);
          }
        });
      }
    }
  });
}

void check_bf16(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, "strassenkit_native.", op, ": ", name,
              " must be a bfloat16 CPU tensor");
}

// encode_bf16(x (B,M,K) bf16, enc (r, n*m) float32, n, m, Mt, Kt, want_out, G (r, B*Mt, Kt) bf16 or empty)
//   -> (out (r, B*Mt, Kt) bf16 or empty, genc (r, n*m) float32 or empty), as encode
std::tuple<at::Tensor, at::Tensor> encode_bf16(const at::Tensor& x_, const at::Tensor& enc_, int64_t n, int64_t m,
                                               int64_t Mt, int64_t Kt, bool want_out, const at::Tensor& G_) {
  check_bf16(x_, "encode_bf16", "x");
  TORCH_CHECK(x_.dim() == 3, "strassenkit_native.encode_bf16: x must be (B, M, K)");
  TORCH_CHECK(enc_.dim() == 2 && enc_.size(1) == n * m && enc_.scalar_type() == at::kFloat && enc_.device().is_cpu(),
              "strassenkit_native.encode_bf16: enc must be a float32 CPU tensor (r, n*m)");
  const auto x = x_.contiguous();
  const auto enc = enc_.contiguous();
  const int64_t B = x.size(0), M = x.size(1), K = x.size(2), r = enc.size(0);
  TORCH_CHECK(Mt * n >= M && Kt * m >= K, "strassenkit_native.encode_bf16: Mt/Kt too small");
  const bool want_grad = G_.numel() > 0;
  at::Tensor G;
  if (want_grad) {
    check_bf16(G_, "encode_bf16", "G");
    TORCH_CHECK(G_.sizes() == at::IntArrayRef({r, B * Mt, Kt}), "strassenkit_native.encode_bf16: G must be (r, B*Mt, Kt)");
    G = G_.contiguous();
  }
  at::Tensor out = want_out ? pooled_empty({r, B * Mt, Kt}, x.options()) : at::empty({0}, x.options());
  at::Tensor genc = want_grad ? at::zeros({r, n * m}, enc.options()) : at::empty({0}, enc.options());
  if (want_out) advise_huge(out);
  if (B * Mt * Kt == 0 || r == 0) return {out, genc};
  const TileGrid grid{M, K, Mt, Kt, static_cast<int>(n), static_cast<int>(m)};
  encode_bf16_impl(reinterpret_cast<const uint16_t*>(x.data_ptr()), grid, B, enc.data_ptr<float>(), static_cast<int>(r),
                   want_out ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr,
                   want_grad ? reinterpret_cast<const uint16_t*>(G.data_ptr()) : nullptr,
                   want_grad ? genc.data_ptr<float>() : nullptr);
  return {out, genc};
}

// decode_bf16(P (r, B*Mt, Nt) bf16, dec (n*p, r) float32, n, p, B, Mt, M, N, bias (N,) float32 or None) -> y bf16
at::Tensor decode_bf16(const at::Tensor& P_, const at::Tensor& dec_, int64_t n, int64_t p, int64_t B, int64_t Mt,
                       int64_t M, int64_t N, const std::optional<at::Tensor>& bias_) {
  check_bf16(P_, "decode_bf16", "P");
  TORCH_CHECK(P_.dim() == 3 && P_.size(1) == B * Mt, "strassenkit_native.decode_bf16: P must be (r, B*Mt, Nt)");
  TORCH_CHECK(dec_.dim() == 2 && dec_.size(0) == n * p && dec_.size(1) == P_.size(0) && dec_.scalar_type() == at::kFloat
              && dec_.device().is_cpu(), "strassenkit_native.decode_bf16: dec must be a float32 CPU tensor (n*p, r)");
  TORCH_CHECK(Mt * n >= M && P_.size(2) * p >= N, "strassenkit_native.decode_bf16: M/N too large");
  const auto P = P_.contiguous();
  const auto D = dec_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N && bias_->scalar_type() == at::kFloat && bias_->device().is_cpu(),
                "strassenkit_native.decode_bf16: bias must be a float32 CPU tensor (N,)");
    bias = bias_->contiguous();
  }
  at::Tensor y = pooled_empty({B, M, N}, P.options());
  advise_huge(y);
  if (y.numel() == 0) return y;
  const TileGrid grid{M, N, Mt, P.size(2), static_cast<int>(n), static_cast<int>(p)};
  decode_bf16_impl(reinterpret_cast<const uint16_t*>(P.data_ptr()), static_cast<int>(P.size(0)), grid, B,
                   D.data_ptr<float>(), reinterpret_cast<uint16_t*>(y.data_ptr()),
                   bias.defined() ? bias.data_ptr<float>() : nullptr);
  return y;
}

std::vector<int64_t> pool_stats() { return Pool::get().stats(); }
void pool_empty() { Pool::get().trim(0); }
void fused_rows(int64_t rows) { g_fused_rows.store(rows); }
std::string isa() { return std::string(STRASSENKIT_ISA) + "/" + std::to_string(STRASSENKIT_VEC_BYTES * 8); }
std::vector<int64_t> fused_profile(bool enable) {  // returns and resets the stage nanoseconds
  std::vector<int64_t> out;
  for (auto& v : g_prof) out.push_back(v.exchange(0));
  g_prof_on.store(enable);
  return out;
}
void pool_set_limit(int64_t mb) { Pool::get().set_limit(mb << 20); }

// ------------------------------------------------------------------ fused_train: one C++ autograd node per layer
// fused_train(x, w_hat, enc, dec, bias?, n, m, p, N) -> y: fused_forward (saving x_hat and prod) as a C++ autograd
// function whose backward is fused_backward plus the bias gradient (grad y summed over rows). The same kernels and
// values as ops.EagerSTL on the fused path (tests compare them bit for bit), without the Python autograd.Function's
// per-call cost (~100 us per layer and training step on our CPUs: at d=128 a few percent of a small model's step).
// STLinear uses it in eager training where both the forward and the backward size rules choose the fused path.
struct FusedTrain : public torch::autograd::Function<FusedTrain> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& enc, const at::Tensor& dec, const std::optional<at::Tensor>& bias,
                            int64_t n, int64_t m, int64_t p, int64_t N) {
    auto [y, xh, prod] = fused_forward(x, w, enc, dec, n, m, p, N, true, bias);
    ctx->save_for_backward({x, w, enc, dec, xh, prod});
    ctx->saved_data["n"] = n;
    ctx->saved_data["m"] = m;
    ctx->saved_data["p"] = p;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "double backward (create_graph=True) through the STL fast path is not supported; "
                "use strassenkit.functional.stl_apply_reference for higher-order gradients");
    const at::Tensor& gy = grads[0];
    torch::autograd::variable_list out(9);
    if (!gy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_e = ctx->needs_input_grad(2), need_d = ctx->needs_input_grad(3);
    if (need_x || need_w || need_e || need_d) {
      auto [gx, gw, ge, gd] = fused_backward(gy, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                             ctx->saved_data["n"].toInt(), ctx->saved_data["m"].toInt(),
                                             ctx->saved_data["p"].toInt(), need_x, need_w, need_e, need_d);
      if (need_x) out[0] = gx;
      if (need_w) out[1] = gw;
      if (need_e) out[2] = ge;
      if (need_d) out[3] = gd;
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(4)) out[4] = gy.sum({0, 1});
    return out;
  }
};

at::Tensor fused_train(const at::Tensor& x, const at::Tensor& w, const at::Tensor& enc, const at::Tensor& dec,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t p, int64_t N) {
  return FusedTrain::apply(x, w, enc, dec, bias, n, m, p, N);
}

// below autograd (no gradient recorded): the forward alone, nothing saved
at::Tensor fused_train_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& enc, const at::Tensor& dec,
                           const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t p, int64_t N) {
  return std::get<0>(fused_forward(x, w, enc, dec, n, m, p, N, false, bias));
}

}  // namespace

// Schemas here, CPU kernels below; shape-only (fake) kernels are registered from Python
// (strassenkit/functional/native.py) so that torch.compile can trace code that calls these ops.
TORCH_LIBRARY(strassenkit_native, lib) {
  lib.def("encode(Tensor x, Tensor enc, int n, int m, int Mt, int Kt, bool want_out, Tensor G) -> (Tensor, Tensor)");
  lib.def("decode(Tensor P, Tensor dec, int n, int p, int B, int Mt, int M, int N, Tensor? bias=None) -> Tensor");
  lib.def("bmm(Tensor a, Tensor b) -> Tensor");
  lib.def("encode_bf16(Tensor x, Tensor enc, int n, int m, int Mt, int Kt, bool want_out, Tensor G) -> (Tensor, Tensor)");
  lib.def("decode_bf16(Tensor P, Tensor dec, int n, int p, int B, int Mt, int M, int N, Tensor? bias=None) -> Tensor");
  lib.def("fused_forward(Tensor x, Tensor w_hat, Tensor enc, Tensor dec, int n, int m, int p, int N, bool save, "
          "Tensor? bias=None) -> (Tensor, Tensor, Tensor)");
  lib.def("fused_backward(Tensor gy, Tensor x, Tensor w_hat, Tensor enc, Tensor dec, Tensor x_hat, Tensor prod, int n, int m, int p, "
          "bool need_x, bool need_w, bool need_enc, bool need_dec) -> (Tensor, Tensor, Tensor, Tensor)");
  lib.def("fused_train(Tensor x, Tensor w_hat, Tensor enc, Tensor dec, Tensor? bias, int n, int m, int p, int N) -> Tensor");
  lib.def("pool_stats() -> int[]");
  lib.def("pool_empty() -> ()");
  lib.def("fused_rows(int rows) -> ()");
  lib.def("isa() -> str");
  lib.def("fused_profile(bool enable) -> int[]");
  lib.def("pool_set_limit(int mb) -> ()");
}

TORCH_LIBRARY_IMPL(strassenkit_native, CPU, lib) {
  lib.impl("encode", &encode);
  lib.impl("decode", &decode);
  lib.impl("bmm", &bmm);
  lib.impl("encode_bf16", &encode_bf16);
  lib.impl("decode_bf16", &decode_bf16);
  lib.impl("fused_forward", &fused_forward);
  lib.impl("fused_backward", &fused_backward);
  lib.impl("fused_train", &fused_train_cpu);
}

TORCH_LIBRARY_IMPL(strassenkit_native, Autograd, lib) { lib.impl("fused_train", &fused_train); }

TORCH_LIBRARY_IMPL(strassenkit_native, CompositeExplicitAutograd, lib) {  // no tensor arguments: no dispatch key
  lib.impl("pool_stats", &pool_stats);
  lib.impl("pool_empty", &pool_empty);
  lib.impl("fused_rows", &fused_rows);
  lib.impl("isa", &isa);
  lib.impl("fused_profile", &fused_profile);
  lib.impl("pool_set_limit", &pool_set_limit);
}
