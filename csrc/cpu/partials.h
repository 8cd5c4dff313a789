// Per-thread partial sums of a column reduction (dweight, dbias), added in a fixed order: deterministic, no atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace fastenc {

// Sums the (chunks, n) partials over chunks, in chunk order.
inline at::Tensor sum_partials(const at::Tensor& partial) {
  at::Tensor out = at::zeros({partial.size(1)}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "fastenc_sum_partials", [&] {
    const scalar_t* p = partial.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t chunks = partial.size(0), n = partial.size(1);
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t j = 0; j < n; ++j) o[j] += p[c * n + j];
    }
  });
  return out;
}

}  // namespace fastenc
