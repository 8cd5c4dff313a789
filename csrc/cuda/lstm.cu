// The fused LSTM cell of one step on CUDA: one thread per (row, hidden unit), which reads that unit's four gate
// preactivations and writes its gates, c and r. Consecutive threads take consecutive units, so each of the four
// gate slices is read and written coalesced. The step's GEMM (cuBLAS) and the time loop live in ../lstm.cpp.
// Full-precision expf / tanhf: at a few elements per thread the cell is latency-bound, not ALU-bound.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../lstm.h"

namespace fastenc {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

template <typename T>
__global__ void lstm_cell_forward_kernel(const T* __restrict__ hw, const T* __restrict__ gates_x,
                                         const T* __restrict__ c_prev, T* __restrict__ gates, T* __restrict__ c,
                                         T* __restrict__ r, int64_t elements, int64_t hidden) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / hidden, j = e - row * hidden;
    const int64_t k = row * 4 * hidden + j;
    const T* a = hw + k;
    const T* x = gates_x + k;
    T* g = gates + k;
    const T i = sigmoid(a[0] + x[0]), f = sigmoid(a[hidden] + x[hidden]);
    const T gg = tanh_of(a[2 * hidden] + x[2 * hidden]), o = sigmoid(a[3 * hidden] + x[3 * hidden]);
    const T c_t = f * c_prev[e] + i * gg;
    g[0] = i;
    g[hidden] = f;
    g[2 * hidden] = gg;
    g[3 * hidden] = o;
    c[e] = c_t;
    r[e] = o * tanh_of(c_t);
  }
}

template <typename T>
__global__ void lstm_cell_backward_kernel(const T* __restrict__ gates, const T* __restrict__ c,
                                          const T* __restrict__ c_prev, const T* __restrict__ dr, T* __restrict__ dc,
                                          T* __restrict__ d_gates, int64_t elements, int64_t hidden) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / hidden, j = e - row * hidden;
    const T* g = gates + row * 4 * hidden + j;
    T* dg = d_gates + row * 4 * hidden + j;
    const T i = g[0], f = g[hidden], gg = g[2 * hidden], o = g[3 * hidden];
    const T tc = tanh_of(c[e]);
    const T dc_t = dc[e] + dr[e] * o * (T(1) - tc * tc);
    dg[0] = dc_t * gg * i * (T(1) - i);
    dg[hidden] = dc_t * c_prev[e] * f * (T(1) - f);
    dg[2 * hidden] = dc_t * i * (T(1) - gg * gg);
    dg[3 * hidden] = dr[e] * tc * o * (T(1) - o);
    dc[e] = dc_t * f;
  }
}

unsigned blocks_for(int64_t elements) {
  const int64_t max_blocks = 65535;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>((elements + kThreads - 1) / kThreads, 1),
                                                 max_blocks));
}

}  // namespace

void lstm_cell_forward_cuda(const at::Tensor& hw, const at::Tensor& gates_x, const at::Tensor& c_prev,
                            at::Tensor& gates, at::Tensor& c, at::Tensor& r) {
  const c10::cuda::CUDAGuard guard(hw.device());
  const int64_t elements = c.numel(), hidden = c.size(1);
  if (elements == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(hw.scalar_type(), "lstm_cell_forward_cuda", [&] {
    lstm_cell_forward_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(
        hw.data_ptr<scalar_t>(), gates_x.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), elements, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lstm_cell_backward_cuda(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                             const at::Tensor& dr, at::Tensor& dc, at::Tensor& d_gates) {
  const c10::cuda::CUDAGuard guard(gates.device());
  const int64_t elements = c.numel(), hidden = c.size(1);
  if (elements == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_backward_cuda", [&] {
    lstm_cell_backward_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(
        gates.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), dr.data_ptr<scalar_t>(),
        dc.data_ptr<scalar_t>(), d_gates.data_ptr<scalar_t>(), elements, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastenc
