// Residual-add + LayerNorm on CUDA.
//
// Forward and dx: one row per warp (N small: 4 rows per 128-thread block) or per block (N large). Each thread
// keeps a Welford state (count, mean, M2) over its elements, and the row's states are merged with warp shuffles
// and, across warps, shared memory (Chan's formula: stable, unlike E[x^2] - E[x]^2). The second pass re-reads the
// row (from L1/L2). Loads and stores are 16-byte vectors when every row start is aligned (base pointer aligned and
// N a multiple of the vector width); otherwise scalar.
// dweight / dbias: a column kernel writes per-block partial sums (blocks, N) in op-math; a second kernel sums them
// over blocks in a fixed order. No atomics, so the results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../layer_norm.h"

namespace fastenc {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;      // threads per row at most (one block)
constexpr int kRowsPerWarpBlock = 4;  // rows per block when a row gets one warp

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& pack) {
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

__device__ __forceinline__ float rsqrt_(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_(double v) { return rsqrt(v); }

template <typename A>
struct Welford {
  A count, mean, m2;
};

template <typename A>
__device__ __forceinline__ void welford_add(Welford<A>& s, A v) {
  s.count += A(1);
  const A delta = v - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (v - s.mean);
}

template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.count == A(0)) return a;
  if (a.count == A(0)) return b;
  const A count = a.count + b.count;
  const A nb = b.count / count;
  const A delta = b.mean - a.mean;
  return {count, a.mean + delta * nb, a.m2 + b.m2 + delta * delta * a.count * nb};
}

template <typename A>
__device__ __forceinline__ Welford<A> warp_merge(Welford<A> s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Welford<A> other{__shfl_xor_sync(0xffffffffu, s.count, offset), __shfl_xor_sync(0xffffffffu, s.mean, offset),
                     __shfl_xor_sync(0xffffffffu, s.m2, offset)};
    s = welford_merge(s, other);
  }
  return s;
}

// Merges the states of the blockDim.x threads of a row; every thread gets the row's state. With more than one warp
// per row the block holds a single row (blockDim.y == 1), so __syncthreads() is reached by all of its threads.
template <typename A>
__device__ Welford<A> row_merge(Welford<A> s) {
  s = warp_merge(s);
  if (blockDim.x == kWarp) return s;
  __shared__ Welford<A> partial[kMaxThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  s = lane < blockDim.x / kWarp ? partial[lane] : Welford<A>{A(0), A(0), A(0)};
  return warp_merge(s);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Two row sums at once (same layout rules as row_merge).
template <typename A>
__device__ void row_sum2(A& a, A& b) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x == kWarp) return;
  __shared__ A partial[2][kMaxThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  const bool live = lane < blockDim.x / kWarp;
  a = warp_sum(live ? partial[0][lane] : A(0));
  b = warp_sum(live ? partial[1][lane] : A(0));
}

// x (+ residual) at element j of a row, rounded to T as torch's `x + residual` is, in op-math.
template <typename T, typename A, int V>
__device__ __forceinline__ void load_sum(const T* x, const T* r, int64_t j, A (&out)[V], Pack<T, V>& rounded) {
  const Pack<T, V> xv = load<V>(x + j);
  if (r) {
    const Pack<T, V> rv = load<V>(r + j);
#pragma unroll
    for (int k = 0; k < V; ++k) rounded.v[k] = static_cast<T>(static_cast<A>(xv.v[k]) + static_cast<A>(rv.v[k]));
  } else {
    rounded = xv;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<A>(rounded.v[k]);
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const A* __restrict__ weight, const A* __restrict__ bias,
    T* __restrict__ y, T* sum /* read back below */, A* __restrict__ mean_out, A* __restrict__ rstd_out, int64_t m,
    int64_t n, A eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only the last block of a one-warp-per-row launch can hold rows beyond m; their warps skip the memory work but
  // still run the (shuffle-only) reduction, so no thread leaves before a collective.
  const bool live = row < m;
  const int64_t off = row * n;
  const T* xr = x + off;
  const T* rr = residual ? residual + off : nullptr;
  T* sr = sum ? sum + off : nullptr;

  Welford<A> state{A(0), A(0), A(0)};
  if (live) {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += static_cast<int64_t>(blockDim.x) * V) {
      A v[V];
      Pack<T, V> rounded;
      load_sum<T, A, V>(xr, rr, j, v, rounded);
      if (sr) store<V>(sr + j, rounded);
#pragma unroll
      for (int k = 0; k < V; ++k) welford_add(state, v[k]);
    }
  }
  state = row_merge(state);
  if (!live) return;  // no barrier follows
  const A mean = state.mean;
  const A rstd = rsqrt_(state.m2 / static_cast<A>(n) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  // The stored sum (written by this same thread above) is one stream instead of two.
  const T* src = sr ? sr : xr;
  const T* src_r = sr ? nullptr : rr;
  T* yr = y + off;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += static_cast<int64_t>(blockDim.x) * V) {
    A v[V];
    Pack<T, V> rounded;
    load_sum<T, A, V>(src, src_r, j, v, rounded);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A o = (v[k] - mean) * rstd;
      if (weight) o *= weight[j + k];
      if (bias) o += bias[j + k];
      out.v[k] = static_cast<T>(o);
    }
    store<V>(yr + j, out);
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_backward_dx_kernel(
    const T* __restrict__ dy, const T* __restrict__ dsum, const T* __restrict__ xs, const A* __restrict__ weight,
    const A* __restrict__ mean_in, const A* __restrict__ rstd_in, T* __restrict__ dx, int64_t m, int64_t n) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < m;
  const int64_t off = row * n;
  const A mean = live ? mean_in[row] : A(0);
  const A rstd = live ? rstd_in[row] : A(0);

  // sum(g) and sum(g * xhat) over the row, g = dy * weight, xhat = (xs - mean) * rstd.
  A sum_g = A(0), sum_gx = A(0);
  if (live) {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += static_cast<int64_t>(blockDim.x) * V) {
      const Pack<T, V> dv = load<V>(dy + off + j);
      const Pack<T, V> xv = load<V>(xs + off + j);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        A g = static_cast<A>(dv.v[k]);
        if (weight) g *= weight[j + k];
        sum_g += g;
        sum_gx += g * (static_cast<A>(xv.v[k]) - mean) * rstd;
      }
    }
  }
  row_sum2(sum_g, sum_gx);
  if (!live) return;
  const A mean_g = sum_g / static_cast<A>(n);
  const A mean_gx = sum_gx / static_cast<A>(n);
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += static_cast<int64_t>(blockDim.x) * V) {
    const Pack<T, V> dv = load<V>(dy + off + j);
    const Pack<T, V> xv = load<V>(xs + off + j);
    Pack<T, V> ds;
    if (dsum) ds = load<V>(dsum + off + j);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A g = static_cast<A>(dv.v[k]);
      if (weight) g *= weight[j + k];
      const A xhat = (static_cast<A>(xv.v[k]) - mean) * rstd;
      A o = rstd * (g - mean_g - xhat * mean_gx);
      if (dsum) o += static_cast<A>(ds.v[k]);
      out.v[k] = static_cast<T>(o);
    }
    store<V>(dx + off + j, out);
  }
}

constexpr int kColTile = 32;  // columns per block (one per lane)
constexpr int kColRows = 16;  // threads down the rows (blockDim.y)

// Block (bx, by) sums dy * xhat and dy over its columns [bx*32, bx*32+32) and rows [by*rows_per_block, ...):
// partial[by][col]. Lanes read consecutive columns of a row (coalesced).
template <typename T, typename A>
__global__ void layer_norm_backward_params_kernel(const T* __restrict__ dy, const T* __restrict__ xs,
                                                  const A* __restrict__ mean_in, const A* __restrict__ rstd_in,
                                                  A* __restrict__ dw_partial, A* __restrict__ db_partial, int64_t m,
                                                  int64_t n, int64_t rows_per_block) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < m ? row_begin + rows_per_block : m;
  A dw = A(0), db = A(0);
  if (col < n) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kColRows) {
      const A d = static_cast<A>(dy[row * n + col]);
      db += d;
      if (dw_partial) dw += d * (static_cast<A>(xs[row * n + col]) - mean_in[row]) * rstd_in[row];
    }
  }
  // Sum the kColRows threads of each column in a fixed order.
  __shared__ A tile[2][kColRows][kColTile + 1];
  tile[0][threadIdx.y][threadIdx.x] = dw;
  tile[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    A w = A(0), b = A(0);
#pragma unroll
    for (int i = 0; i < kColRows; ++i) {
      w += tile[0][i][threadIdx.x];
      b += tile[1][i][threadIdx.x];
    }
    const int64_t out = static_cast<int64_t>(blockIdx.y) * n + col;
    if (dw_partial) dw_partial[out] = w;
    if (db_partial) db_partial[out] = b;
  }
}

// out[col] = sum over blocks of partial[block][col], blocks in order.
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t blocks, int64_t n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  A total = A(0);
  for (int64_t b = 0; b < blocks; ++b) total += partial[b * n + col];
  out[col] = total;
}

// Threads per row: a warp for short rows, up to kMaxThreads so that each thread has about 4 vectors.
struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t m, int64_t n, int vec) {
  const int64_t vectors = (n + vec - 1) / vec;
  int threads = kWarp;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 4 < vectors) threads *= 2;
  const int rows = threads == kWarp ? kRowsPerWarpBlock : 1;
  return {dim3(static_cast<unsigned>((m + rows - 1) / rows)), dim3(threads, rows)};
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value()) return std::nullopt;
  return p->to(acc).contiguous();
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

template <typename T>
const T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

LayerNormForward layer_norm_forward_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                         const std::optional<at::Tensor>& weight_in,
                                         const std::optional<at::Tensor>& bias_in, double eps, bool store_sum) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto residual = contiguous(residual_in);
  const int64_t m = x.size(0), n = x.size(1);
  const auto acc = stat_type(x.scalar_type());
  const auto weight = as_acc(weight_in, acc);
  const auto bias = as_acc(bias_in, acc);

  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor sum = store_sum && residual ? at::empty({m, n}, x.options()) : x.new_empty({0});
  at::Tensor mean = at::empty({m}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({m}, x.options().dtype(acc));
  if (m == 0) return {y, sum, mean, rstd};
  if (n == 0) {
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {y, sum, mean, rstd};
  }
  TORCH_CHECK(m <= INT32_MAX, "x has too many rows for one launch: ", m);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastenc_layer_norm_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr<scalar_t>(residual);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = sum.numel() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = n % kVec == 0 && aligned16(xp) && aligned16(rp) && aligned16(yp) && aligned16(sp);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const RowLaunch l = row_launch(m, n, V);
      layer_norm_forward_kernel<scalar_t, A, V><<<l.grid, l.block, 0, stream>>>(
          xp, rp, ptr<A>(weight), ptr<A>(bias), yp, sp, mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), m, n,
          static_cast<A>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {y, sum, mean, rstd};
}

LayerNormBackward layer_norm_backward_cuda(const at::Tensor& dy_in, const std::optional<at::Tensor>& dsum_in,
                                           const at::Tensor& xs_in, const std::optional<at::Tensor>& weight_in,
                                           const at::Tensor& mean_in, const at::Tensor& rstd_in, bool has_bias) {
  const c10::cuda::CUDAGuard guard(xs_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor xs = xs_in.contiguous();
  const auto dsum = contiguous(dsum_in);
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t m = xs.size(0), n = xs.size(1);
  const auto acc = stat_type(xs.scalar_type());
  const auto weight = as_acc(weight_in, acc);
  const auto acc_opts = xs.options().dtype(acc);

  at::Tensor dx = at::empty({m, n}, xs.options());
  at::Tensor dweight = weight ? at::zeros({n}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor dbias = has_bias ? at::zeros({n}, acc_opts) : at::empty({0}, acc_opts);
  if (m == 0 || n == 0) return {dx, dweight, dbias};  // parameter gradients over no rows: zeros
  TORCH_CHECK(m <= INT32_MAX, "xs has too many rows for one launch: ", m);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "fastenc_layer_norm_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* dsp = ptr<scalar_t>(dsum);
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = n % kVec == 0 && aligned16(dyp) && aligned16(dsp) && aligned16(xp) && aligned16(dxp);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const RowLaunch l = row_launch(m, n, V);
      layer_norm_backward_dx_kernel<scalar_t, A, V><<<l.grid, l.block, 0, stream>>>(
          dyp, dsp, xp, ptr<A>(weight), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(), dxp, m, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }

    if (!weight && !has_bias) return;
    // Enough row blocks to fill the GPU about four times over, each at least 32 rows deep.
    const int64_t col_blocks = (n + kColTile - 1) / kColTile;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t want = std::max<int64_t>(1, (4 * sms + col_blocks - 1) / col_blocks);
    const int64_t row_blocks = std::min<int64_t>({want, (m + 31) / 32, 65535});
    const int64_t rows_per_block = (m + row_blocks - 1) / row_blocks;
    at::Tensor dw_partial = weight ? at::empty({row_blocks, n}, acc_opts) : at::Tensor();
    at::Tensor db_partial = has_bias ? at::empty({row_blocks, n}, acc_opts) : at::Tensor();
    A* dwp = weight ? dw_partial.mutable_data_ptr<A>() : nullptr;
    A* dbp = has_bias ? db_partial.mutable_data_ptr<A>() : nullptr;
    layer_norm_backward_params_kernel<scalar_t, A>
        <<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)), dim3(kColTile, kColRows), 0,
           stream>>>(dyp, xp, mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(), dwp, dbp, m, n, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned sum_blocks = static_cast<unsigned>((n + 255) / 256);
    if (weight) {
      sum_partials_kernel<A><<<sum_blocks, 256, 0, stream>>>(dwp, dweight.mutable_data_ptr<A>(), row_blocks, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (has_bias) {
      sum_partials_kernel<A><<<sum_blocks, 256, 0, stream>>>(dbp, dbias.mutable_data_ptr<A>(), row_blocks, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace fastenc
