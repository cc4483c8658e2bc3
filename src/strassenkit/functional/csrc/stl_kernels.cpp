// Native CPU kernels for the STL fast path (strassenkit/functional/ops.py), float32 and float64.
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
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int width = 32 / sizeof(T);
};
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

template <typename T>
inline void store_vec(T* dst, vec_t<T> v, bool stream) {
#if defined(__AVX__)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(dst, reinterpret_cast<__m256>(v));
    } else {
      _mm256_stream_pd(dst, reinterpret_cast<__m256d>(v));
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

// out (R x cols, ld ldo) = A (R x J, row-major) @ B (J x cols, ld ldb)
template <typename T, bool kStream = false>
void small_gemm(const T* A, int R, int J, const T* B, int64_t ldb, T* out, int64_t ldo, int cols) {
  int i = 0;
  for (; i + 6 <= R; i += 6) micro_gemm<T, 6, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols);
  switch (R - i) {
    case 5: micro_gemm<T, 5, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols); break;
    case 4: micro_gemm<T, 4, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols); break;
    case 3: micro_gemm<T, 3, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols); break;
    case 2: micro_gemm<T, 2, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols); break;
    case 1: micro_gemm<T, 1, kStream>(A + i * J, J, J, B, ldb, out + i * ldo, ldo, cols); break;
    default: break;
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

// float, tile width 4: 8 consecutive tiles' columns <-> 4 vectors of 8 (one per column-in-tile v).
// deinterleave: a[0..3] = 32 floats [c0v0 c0v1 c0v2 c0v3 c1v0 ...]  ->  r[v] = [c0v .. c7v]
inline void deinterleave4(const float* src, float* dst0, int64_t ld) {
  using V8 = vec_t<float>;
  const V8 a0 = vload(src), a1 = vload(src + 8), a2 = vload(src + 16), a3 = vload(src + 24);
  const V8 s0 = __builtin_shufflevector(a0, a1, 0, 4, 8, 12, 1, 5, 9, 13);
  const V8 s1 = __builtin_shufflevector(a0, a1, 2, 6, 10, 14, 3, 7, 11, 15);
  const V8 s2 = __builtin_shufflevector(a2, a3, 0, 4, 8, 12, 1, 5, 9, 13);
  const V8 s3 = __builtin_shufflevector(a2, a3, 2, 6, 10, 14, 3, 7, 11, 15);
  vstore(dst0, __builtin_shufflevector(s0, s2, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst0 + ld, __builtin_shufflevector(s0, s2, 4, 5, 6, 7, 12, 13, 14, 15));
  vstore(dst0 + 2 * ld, __builtin_shufflevector(s1, s3, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst0 + 3 * ld, __builtin_shufflevector(s1, s3, 4, 5, 6, 7, 12, 13, 14, 15));
}
// the inverse: r[v] (4 rows of 8, stride ld) -> 32 interleaved floats
inline void interleave4(const float* src0, int64_t ld, float* dst, bool stream) {
  using V8 = vec_t<float>;
  const V8 r0 = vload(src0), r1 = vload(src0 + ld), r2 = vload(src0 + 2 * ld), r3 = vload(src0 + 3 * ld);
  const V8 s0 = __builtin_shufflevector(r0, r1, 0, 1, 2, 3, 8, 9, 10, 11);
  const V8 s1 = __builtin_shufflevector(r2, r3, 0, 1, 2, 3, 8, 9, 10, 11);
  const V8 s2 = __builtin_shufflevector(r0, r1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V8 s3 = __builtin_shufflevector(r2, r3, 4, 5, 6, 7, 12, 13, 14, 15);
  store_vec(dst, __builtin_shufflevector(s0, s1, 0, 4, 8, 12, 1, 5, 9, 13), stream);
  store_vec(dst + 8, __builtin_shufflevector(s0, s1, 2, 6, 10, 14, 3, 7, 11, 15), stream);
  store_vec(dst + 16, __builtin_shufflevector(s2, s3, 0, 4, 8, 12, 1, 5, 9, 13), stream);
  store_vec(dst + 24, __builtin_shufflevector(s2, s3, 2, 6, 10, 14, 3, 7, 11, 15), stream);
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
void gather_tiles(const T* x, const TileGrid& g, int64_t q0, int len, int cols, T* buf) {
  constexpr int CB = kChunk<T>;
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
void scatter_tiles(const T* obuf, const TileGrid& g, int64_t q0, int len, T* y, bool stream) {
  constexpr int CB = kChunk<T>;
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

template <typename T>
void encode_impl(const T* x, const TileGrid& g, int64_t B, const T* E, int r, T* out, const T* G, T* genc) {
  constexpr int CB = kChunk<T>;
  const int J = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;  // columns of the bmm layout; also the stride between ranks
  const int64_t chunks = (Q + CB - 1) / CB;
  const Split split = split_chunks(chunks, int64_t(CB) * r * J);
  std::vector<vec_t<T>> partial(genc ? split.pieces * r * J : 0, vec_t<T>{});  // one per piece
  const bool stream = out && size_t(r) * Q * sizeof(T) >= kStreamBytes;
  // Rows Q apart stay 32-byte aligned (chunk starts are multiples of CB): no staging copy needed.
  const bool direct = stream && (Q * sizeof(T)) % 32 == 0 && (reinterpret_cast<uintptr_t>(out) & 31) == 0;
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
  if (genc) {  // sum in piece order: deterministic for a given thread count, whichever thread ran a piece
    for (int q = 0; q < r * J; ++q) {
      vec_t<T> s = vec_t<T>{};
      for (int64_t p = 0; p < split.pieces; ++p) s += partial[p * r * J + q];
      T t = 0;
      for (int w = 0; w < Vec<T>::width; ++w) t += s[w];
      genc[q] = t;
    }
  }
}

template <typename T>
void decode_impl(const T* P, int r, const TileGrid& g, int64_t B, const T* D, T* y) {
  constexpr int CB = kChunk<T>;
  const int R = g.n * g.w;
  const int64_t Q = B * g.Mt * g.Ct;
  const int64_t chunks = (Q + CB - 1) / CB;
  const bool stream = size_t(B) * g.M * g.C * sizeof(T) >= kStreamBytes;
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
        scatter_tiles(obuf.data(), g, q0, len, y, stream);
      }
    }
    stream_fence(stream);
  });
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
  at::Tensor out = want_out ? at::empty({r, B * Mt, Kt}, x.options()) : at::empty({0}, x.options());
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
                  int64_t M, int64_t N) {
  check_float(P_, "P");
  TORCH_CHECK(P_.dim() == 3 && P_.size(1) == B * Mt, "strassenkit_native.decode: P must be (r, B*Mt, Nt)");
  TORCH_CHECK(dec_.dim() == 2 && dec_.size(0) == n * p && dec_.size(1) == P_.size(0),
              "strassenkit_native.decode: dec must be (n*p, r)");
  TORCH_CHECK(dec_.scalar_type() == P_.scalar_type(), "strassenkit_native.decode: dtype mismatch");
  TORCH_CHECK(Mt * n >= M && P_.size(2) * p >= N, "strassenkit_native.decode: M/N too large");
  const auto P = P_.contiguous();
  const auto D = dec_.contiguous();
  at::Tensor y = at::empty({B, M, N}, P.options());
  advise_huge(y);
  const TileGrid grid{M, N, Mt, P.size(2), static_cast<int>(n), static_cast<int>(p)};
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "strassenkit_native.decode", [&] {
    decode_impl<scalar_t>(P.data_ptr<scalar_t>(), P.size(0), grid, B, D.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "strassenkit_native.bmm: shapes (r,X,Y) @ (r,Y,Z) expected");
  const int64_t r = a.size(0);
  at::Tensor out = at::empty({r, a.size(1), b.size(2)}, a.options());
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

}  // namespace

// Schemas here, CPU kernels below; shape-only (fake) kernels are registered from Python
// (strassenkit/functional/native.py) so that torch.compile can trace code that calls these ops.
TORCH_LIBRARY(strassenkit_native, lib) {
  lib.def("encode(Tensor x, Tensor enc, int n, int m, int Mt, int Kt, bool want_out, Tensor G) -> (Tensor, Tensor)");
  lib.def("decode(Tensor P, Tensor dec, int n, int p, int B, int Mt, int M, int N) -> Tensor");
  lib.def("bmm(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(strassenkit_native, CPU, lib) {
  lib.impl("encode", &encode);
  lib.impl("decode", &decode);
  lib.impl("bmm", &bmm);
}
