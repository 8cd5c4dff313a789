// Bias + activation (+ dropout) on CPU: one pass over memory each way, rows split over threads with
// at::parallel_for.
//
// float32, bfloat16 and float16 rows are loaded, widened to float32, computed and rounded once at the store;
// float64 rows are computed in float64. The float32 loops are branch-free element functions inlined into
// FASTENC_CPU_CLONES row functions, so that gcc vectorises them for each target. Everything in them is plain
// integer / float arithmetic for that reason: std::erf and std::exp are scalar calls, and gcc's _Float16
// conversions scalar instructions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../bias_activation.h"
#include "partials.h"
#include "simd.h"

namespace fastenc {
namespace {

enum class Act { kRelu, kGelu, kGeluTanh };

// The entry point has checked the name.
Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  TORCH_INTERNAL_ASSERT(name == "gelu_tanh", "unknown activation ", name);
  return Act::kGeluTanh;
}

// Rows handed to a thread at least: ~32K elements, so small problems are not split into tiny chunks.
constexpr int64_t kGrainElements = 32768;

// Rows (and blocks) a float32 bias gradient sums at each level of its cascade (see the backward).
constexpr int64_t kSumRows = 32;

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(n, 1)); }

FASTENC_INLINE uint32_t as_bits(float v) { return std::bit_cast<uint32_t>(v); }
FASTENC_INLINE float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

// ---- Storage formats: load widens to float32, store rounds to nearest even (as c10's conversions do).

struct Float32 {
  using T = float;
  static FASTENC_INLINE float load(float v) { return v; }
  static FASTENC_INLINE float store(float v) { return v; }
};

struct BFloat16 {
  using T = uint16_t;
  static FASTENC_INLINE float load(uint16_t v) { return from_bits(static_cast<uint32_t>(v) << 16); }
  static FASTENC_INLINE uint16_t store(float v) {
    const uint32_t u = as_bits(v);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
  }
};

struct Float16 {
  using T = uint16_t;
  static FASTENC_INLINE float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    // Exponent and mantissa move into place and one multiply rebiases the exponent by 112, subnormal halves
    // (float32 subnormals here) included; the all-ones exponent is then forced back to all ones. No select
    // between float values: gcc would sink one side into a branch and not vectorise the loop.
    const uint32_t magnitude = as_bits(from_bits(em << 13) * 0x1p112f);
    const uint32_t all_ones = 0u - ((em + 0x400u) >> 15);  // em >= 0x7c00, as a mask
    return from_bits(magnitude | (all_ones & 0x7f800000u) | sign);
  }
  static FASTENC_INLINE uint16_t store(float v) {
    const uint32_t u = as_bits(v);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // From 2^-14 up: rebias the exponent by -112 and round off 13 mantissa bits (a carry into the exponent gives
    // the right result). Below: the significand shifted right to the 2^-24 grid of the subnormals, rounded the
    // same way (integers only: a float value on one side of the select would be sunk into a branch by gcc and
    // the loop not vectorised).
    const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    int32_t shift = 126 - static_cast<int32_t>(a >> 23);
    shift = std::min(std::max(shift, 14), 25);
    const uint32_t significand = (a & 0x7fffffu) | 0x800000u;
    const uint32_t subnormal =
        (significand + (1u << (shift - 1)) - 1u + ((significand >> shift) & 1u)) >> shift;
    // Selects by masks: gcc narrows these values to 16 bits and then cannot vectorise a select between them.
    const uint32_t tiny = 0u - static_cast<uint32_t>(a < 0x38800000u);
    const uint32_t huge = 0u - static_cast<uint32_t>(a >= 0x477ff000u);  // from 65520 up: infinity
    const uint32_t nan = 0u - static_cast<uint32_t>(a > 0x7f800000u);
    uint32_t h = (subnormal & tiny) | (normal & ~tiny);
    h = (h & ~huge) | (0x7c00u & huge);
    h = (h & ~nan) | (0x7e00u & nan);
    return static_cast<uint16_t>(sign | h);
  }
};

// ---- float32 math. Coefficients: weighted least squares on Chebyshev nodes against float64 / mpmath.

// e^(hi + lo), with |lo| much smaller than |hi|: the pair carries an argument that float32 cannot hold exactly
// (an error of one ulp in an argument of 50 is 50 ulps in the result). hi is clamped to [-170, 89], beyond which
// the float32 result is 0 or inf anyway; that keeps 2^k a product of two normal floats.
FASTENC_INLINE float exp_pair(float hi, float lo) {
  hi = hi < -170.f ? -170.f : hi;
  hi = hi > 89.f ? 89.f : hi;
  constexpr float kShift = 0x1.8p23f;  // adding it rounds to an integer, which lands in the low mantissa bits
  const float shifted = (hi + lo) * 0x1.715476p0f + kShift;
  const int32_t k = static_cast<int32_t>(as_bits(shifted) - as_bits(kShift));
  const float kf = shifted - kShift;
  // ln 2 in two parts; the first has 15 significant bits, so kf * kLn2Hi is exact for |k| < 512.
  constexpr float kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;
  const float r = ((hi - kf * kLn2Hi) - kf * kLn2Lo) + lo;  // |r| <= ln2 / 2
  const float q = 0x1.fffff8p-2f +
                  r * (0x1.55548ap-3f + r * (0x1.555b7cp-5f + r * (0x1.123f0cp-7f + r * 0x1.687202p-10f)));
  const float p = 1.f + (r + r * r * q);
  const int32_t k1 = k >> 1, k2 = k - k1;
  return p * from_bits(static_cast<uint32_t>(k1 + 127) << 23) * from_bits(static_cast<uint32_t>(k2 + 127) << 23);
}

// -scale * v^2 as an exact pair (hi, lo) for v >= 0: v's leading 12 bits square exactly in float32.
FASTENC_INLINE void neg_square(float v, float scale, float& hi, float& lo) {
  const float vh = from_bits(as_bits(v) & 0xfffff000u);
  const float vl = v - vh;
  hi = -scale * (vh * vh);
  lo = -scale * (vl * (v + vh));
}

// Q(w) = erfc(w / sqrt 2) = 2 Phi(-w) for 0 <= w <= 16, given e = e^(-w^2 / 2): Q = e * t * h(t) with
// t = c / (c + w). h is smooth and near 1 over t in [c / (c + 16), 1], so a degree-9 polynomial holds it to
// ~1e-8 and float32 Horner adds about an ulp.
constexpr float kTailC = 0x1.c48c6p1f;  // 2.5 sqrt 2

FASTENC_INLINE float upper_tail(float w, float e) {
  const float t = kTailC / (kTailC + w);
  float h = -0x1.caee5cp-6f;
  h = h * t + 0x1.839046p-3f;
  h = h * t - 0x1.e93d2ep-2f;
  h = h * t + 0x1.09a5a4p-1f;
  h = h * t - 0x1.0a669cp-2f;
  h = h * t + 0x1.091212p-2f;
  h = h * t + 0x1.131198p-3f;
  h = h * t + 0x1.b6192ap-3f;
  h = h * t + 0x1.ccf384p-3f;
  h = h * t + 0x1.ce3c2p-3f;
  return e * (t * h);
}

constexpr float kInvSqrt2Pi = 0x1.988454p-2f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2 = 0x1.6a09e6p0f;

// erfc(x) over the whole float32 range; Q(sqrt2 |x|) with the exponent -x^2 taken from x itself.
FASTENC_INLINE float erfc_f32(float x) {
  float a = x < 0 ? -x : x;
  a = a > 11.f ? 11.f : a;  // erfc(11) underflows float32
  float hi, lo;
  neg_square(a, 1.f, hi, lo);
  const float q = upper_tail(kSqrt2 * a, exp_pair(hi, lo));
  const float reflected = 2.f - q;  // both sides computed, then selected: gcc if-converts only non-trapping arms
  return x < 0 ? reflected : q;
}

// Past this |z|, Phi's tail and the density (below 2^-118) are flushed to 0: the products that would follow go
// subnormal, which x86 computes ~100x slower, and a linear layer's outputs reach such values often.
constexpr float kTailFlush = 12.8f;

// Phi(z), the standard normal CDF, and its density. Phi comes from the tail Q on both sides: no 1 + erf(z / sqrt2)
// to cancel for negative z, so GELU's left tail keeps its relative accuracy (down to the flush above).
FASTENC_INLINE void normal_cdf(float z, float& cdf, float& density) {
  float w = z < 0 ? -z : z;
  const bool flushed = w > kTailFlush;  // NaN is not flushed: it passes through
  w = flushed ? kTailFlush : w;
  float hi, lo;
  neg_square(w, 0.5f, hi, lo);
  const float e = flushed ? 0.f : exp_pair(hi, lo);
  const float lower = 0.5f * upper_tail(w, e);
  const float upper = 1.f - lower;
  cdf = z < 0 ? lower : upper;
  density = kInvSqrt2Pi * e;
}

// sigmoid(v) = 1 / (1 + e^-v) = (1 + tanh(v / 2)) / 2, and its derivative s (1 - s), computed as s (s e^-v) to
// keep its relative accuracy where s is near 1. For e^-v past 2^127, s is 0 (the true value is below 2^-127);
// below 2^-125 it is flushed to 0 (s = 1, ds = 0), as the tail above, so nothing goes subnormal.
FASTENC_INLINE void sigmoid(float v, float& s, float& ds) {
  const float a = -v;
  const bool vanishes = a > 88.f;
  const bool saturates = a < -87.f;
  const float e = saturates ? 0.f : exp_pair(vanishes ? 88.f : a, 0.f);
  const float inverse = 1.f / (1.f + e);
  s = vanishes ? 0.f : inverse;
  ds = s * (s * e);
}

constexpr float kTanhScale = 0x1.988454p0f;  // 2 sqrt(2 / pi): gelu_tanh's sigmoid argument is 2u
constexpr float kCubic = 0.044715f;

template <Act A>
FASTENC_INLINE float activate(float z) {
  if constexpr (A == Act::kRelu) {
    return z < 0.f ? 0.f : z;  // NaN passes, as torch's relu
  } else if constexpr (A == Act::kGelu) {
    float cdf, density;
    normal_cdf(z, cdf, density);
    return z * cdf;
  } else {
    // 0.5 z (1 + tanh u) = z sigmoid(2u), u = sqrt(2 / pi) (z + 0.044715 z^3)
    float s, ds;
    sigmoid(kTanhScale * z * (1.f + kCubic * (z * z)), s, ds);
    return z * s;
  }
}

// dy * act'(z)
template <Act A>
FASTENC_INLINE float activate_backward(float z, float dy) {
  if constexpr (A == Act::kRelu) {
    return z <= 0.f ? 0.f : dy;  // torch's threshold_backward
  } else if constexpr (A == Act::kGelu) {
    float cdf, density;
    normal_cdf(z, cdf, density);
    return dy * (cdf + z * density);
  } else {
    const float z2 = z * z;
    float s, ds;
    sigmoid(kTanhScale * z * (1.f + kCubic * z2), s, ds);
    return dy * (s + z * ds * (kTanhScale * (1.f + 3.f * kCubic * z2)));
  }
}

// ---- Dropout: Philox 4x32-10 of (counter = row * N + col mod 2^32, 0, 0, 0) under key = the seed's two words,
// first output word to a uniform float in [0, 1) as Triton's tl.rand does, so the mask is the Triton kernel's.

constexpr int kPhiloxRounds = 10;

struct Dropout {
  uint32_t key0[kPhiloxRounds];  // the key schedule, one key pair per round
  uint32_t key1[kPhiloxRounds];
  float p;
  float scale;  // 1 / (1 - p), rounded as Triton's float32 does
  double scale64;  // 1 / (1 - p) for float64 rows (the keep decision is the float32 one)
};

Dropout make_dropout(double p, int64_t seed) {
  Dropout d;
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    d.key0[r] = k0;
    d.key1[r] = k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  d.p = static_cast<float>(p);
  d.scale = 1.f / (1.f - d.p);
  d.scale64 = 1 / (1 - p);
  return d;
}

FASTENC_INLINE uint32_t mul_hi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// True where the element is kept.
FASTENC_INLINE bool keep(const Dropout& d, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mul_hi(0xCD9E8D57u, p2) ^ c1 ^ d.key0[r];
    c2 = mul_hi(0xD2511F53u, p0) ^ c3 ^ d.key1[r];
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
  }
  int32_t v = static_cast<int32_t>(c0);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f >= d.p;
}

// ---- float32-compute rows. b is a float32 bias row (zeros without a bias); strides are in elements.

template <class S, Act A, bool kDropout>
FASTENC_INLINE void forward_rows(const typename S::T* __restrict x, int64_t x_stride, const float* __restrict b,
                                 typename S::T* __restrict y, int64_t n, int64_t begin, int64_t end, Dropout d) {
  for (int64_t row = begin; row < end; ++row) {
    const typename S::T* __restrict xr = x + row * x_stride;
    typename S::T* __restrict yr = y + row * n;
    const uint32_t base = static_cast<uint32_t>(row * n);
    for (int64_t j = 0; j < n; ++j) {
      float v = activate<A>(S::load(xr[j]) + b[j]);
      if constexpr (kDropout) v *= keep(d, base + static_cast<uint32_t>(j)) ? d.scale : 0.f;
      yr[j] = S::store(v);
    }
  }
}

// dx for rows [begin, end); with kBias their dz summed into the float32 row db.
template <class S, Act A, bool kDropout, bool kBias>
FASTENC_INLINE void backward_rows(const typename S::T* __restrict dy, int64_t dy_stride,
                                  const typename S::T* __restrict x, int64_t x_stride, const float* __restrict b,
                                  typename S::T* __restrict dx, float* __restrict db, int64_t n, int64_t begin,
                                  int64_t end, Dropout d) {
  for (int64_t row = begin; row < end; ++row) {
    const typename S::T* __restrict xr = x + row * x_stride;
    const typename S::T* __restrict dyr = dy + row * dy_stride;
    typename S::T* __restrict dxr = dx + row * n;
    const uint32_t base = static_cast<uint32_t>(row * n);
    for (int64_t j = 0; j < n; ++j) {
      float dz = activate_backward<A>(S::load(xr[j]) + b[j], S::load(dyr[j]));
      if constexpr (kDropout) dz *= keep(d, base + static_cast<uint32_t>(j)) ? d.scale : 0.f;
      dxr[j] = S::store(dz);
      if constexpr (kBias) db[j] += dz;
    }
  }
}

struct RowArgs {
  const void* x;
  int64_t x_stride;
  const void* dy;
  int64_t dy_stride;
  const float* b;
  void* out;
  float* db;  // null: no bias gradient
  int64_t n;
  Act act;
  bool dropout;
};

template <class S, bool kDropout>
FASTENC_INLINE void forward_any(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  using T = typename S::T;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  switch (a.act) {
    case Act::kRelu:
      return forward_rows<S, Act::kRelu, kDropout>(x, a.x_stride, a.b, y, a.n, begin, end, d);
    case Act::kGelu:
      return forward_rows<S, Act::kGelu, kDropout>(x, a.x_stride, a.b, y, a.n, begin, end, d);
    case Act::kGeluTanh:
      return forward_rows<S, Act::kGeluTanh, kDropout>(x, a.x_stride, a.b, y, a.n, begin, end, d);
  }
}

template <class S, bool kDropout, bool kBias>
FASTENC_INLINE void backward_any(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  using T = typename S::T;
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.out);
  switch (a.act) {
    case Act::kRelu:
      return backward_rows<S, Act::kRelu, kDropout, kBias>(dy, a.dy_stride, x, a.x_stride, a.b, dx, a.db, a.n,
                                                           begin, end, d);
    case Act::kGelu:
      return backward_rows<S, Act::kGelu, kDropout, kBias>(dy, a.dy_stride, x, a.x_stride, a.b, dx, a.db, a.n,
                                                           begin, end, d);
    case Act::kGeluTanh:
      return backward_rows<S, Act::kGeluTanh, kDropout, kBias>(dy, a.dy_stride, x, a.x_stride, a.b, dx, a.db,
                                                               a.n, begin, end, d);
  }
}

template <class S>
FASTENC_INLINE void forward_dispatch(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  if (a.dropout) {
    forward_any<S, true>(a, begin, end, d);
  } else {
    forward_any<S, false>(a, begin, end, d);
  }
}

template <class S>
FASTENC_INLINE void backward_dispatch(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  if (a.dropout) {
    a.db ? backward_any<S, true, true>(a, begin, end, d) : backward_any<S, true, false>(a, begin, end, d);
  } else {
    a.db ? backward_any<S, false, true>(a, begin, end, d) : backward_any<S, false, false>(a, begin, end, d);
  }
}

// The multi-versioned entry points, one per storage format (target_clones does not apply to templates).
FASTENC_CPU_CLONES void forward_f32(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  forward_dispatch<Float32>(a, begin, end, d);
}
FASTENC_CPU_CLONES void forward_bf16(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  forward_dispatch<BFloat16>(a, begin, end, d);
}
FASTENC_CPU_CLONES void forward_f16(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  forward_dispatch<Float16>(a, begin, end, d);
}
FASTENC_CPU_CLONES void backward_f32(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  backward_dispatch<Float32>(a, begin, end, d);
}
FASTENC_CPU_CLONES void backward_bf16(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  backward_dispatch<BFloat16>(a, begin, end, d);
}
FASTENC_CPU_CLONES void backward_f16(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d) {
  backward_dispatch<Float16>(a, begin, end, d);
}

FASTENC_CPU_CLONES void erfc_rows(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = erfc_f32(x[i]);
}
FASTENC_CPU_CLONES void sigmoid_rows(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float s, ds;
    sigmoid(x[i], s, ds);
    y[i] = s;
  }
}

// ---- float64: plain loops in float64 (std::erfc keeps the left tail; the mask is the float32 path's).

template <Act A>
double activate64(double z) {
  if constexpr (A == Act::kRelu) {
    return z < 0 ? 0 : z;
  } else if constexpr (A == Act::kGelu) {
    return z * 0.5 * std::erfc(-z * M_SQRT1_2);
  } else {
    return z / (1 + std::exp(-2 * M_2_SQRTPI * M_SQRT1_2 * (z + 0.044715 * z * z * z)));
  }
}

template <Act A>
double activate_backward64(double z, double dy) {
  if constexpr (A == Act::kRelu) {
    return z <= 0 ? 0 : dy;
  } else if constexpr (A == Act::kGelu) {
    const double density = 0.5 * M_2_SQRTPI * M_SQRT1_2 * std::exp(-0.5 * z * z);
    return dy * (0.5 * std::erfc(-z * M_SQRT1_2) + z * density);
  } else {
    const double k = M_2_SQRTPI * M_SQRT1_2;  // sqrt(2 / pi)
    const double t = std::tanh(k * (z + 0.044715 * z * z * z));
    return dy * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z));
  }
}

template <Act A>
void forward_rows64(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d, const double* b) {
  const double* x = static_cast<const double*>(a.x);
  double* y = static_cast<double*>(a.out);
  const double scale = d.scale64;
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t j = 0; j < a.n; ++j) {
      double v = activate64<A>(x[row * a.x_stride + j] + b[j]);
      if (a.dropout) v *= keep(d, static_cast<uint32_t>(row * a.n + j)) ? scale : 0;
      y[row * a.n + j] = v;
    }
  }
}

template <Act A>
void backward_rows64(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d, const double* b,
                     double* db) {
  const double* x = static_cast<const double*>(a.x);
  const double* dy = static_cast<const double*>(a.dy);
  double* dx = static_cast<double*>(a.out);
  const double scale = d.scale64;
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t j = 0; j < a.n; ++j) {
      double dz = activate_backward64<A>(x[row * a.x_stride + j] + b[j], dy[row * a.dy_stride + j]);
      if (a.dropout) dz *= keep(d, static_cast<uint32_t>(row * a.n + j)) ? scale : 0;
      dx[row * a.n + j] = dz;
      if (db) db[j] += dz;
    }
  }
}

void forward64(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d, const double* b) {
  switch (a.act) {
    case Act::kRelu:
      return forward_rows64<Act::kRelu>(a, begin, end, d, b);
    case Act::kGelu:
      return forward_rows64<Act::kGelu>(a, begin, end, d, b);
    case Act::kGeluTanh:
      return forward_rows64<Act::kGeluTanh>(a, begin, end, d, b);
  }
}

void backward64(const RowArgs& a, int64_t begin, int64_t end, const Dropout& d, const double* b, double* db) {
  switch (a.act) {
    case Act::kRelu:
      return backward_rows64<Act::kRelu>(a, begin, end, d, b, db);
    case Act::kGelu:
      return backward_rows64<Act::kGelu>(a, begin, end, d, b, db);
    case Act::kGeluTanh:
      return backward_rows64<Act::kGeluTanh>(a, begin, end, d, b, db);
  }
}

// ---- Tensor plumbing.

// Rows of t with unit column stride (any row stride), copying only when the columns are strided.
at::Tensor unit_columns(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The bias as a contiguous row in the compute dtype; zeros without one.
at::Tensor bias_row(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  const auto acc = acc_type(x.scalar_type());
  if (!bias.has_value()) return at::zeros({x.size(1)}, x.options().dtype(acc));
  return bias->to(acc).contiguous();
}

Dropout dropout_for(double p, const std::optional<at::Tensor>& seed) {
  return make_dropout(p, p > 0 ? seed->item<int64_t>() : 0);
}

RowArgs row_args(const at::Tensor& x, const at::Tensor& out, const at::Tensor& b, const std::string& activation,
                 double dropout_p) {
  RowArgs a{};
  a.x = x.const_data_ptr();
  a.x_stride = row_stride(x);
  a.b = x.scalar_type() == at::kDouble ? nullptr : b.const_data_ptr<float>();
  a.out = out.mutable_data_ptr();
  a.n = x.size(1);
  a.act = parse_activation(activation);
  a.dropout = dropout_p > 0;
  return a;
}

}  // namespace

at::Tensor bias_activation_forward_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                                       const std::string& activation, double dropout_p,
                                       const std::optional<at::Tensor>& dropout_seed) {
  const at::Tensor x = unit_columns(x_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return y;
  const at::Tensor b = bias_row(bias, x);
  const RowArgs a = row_args(x, y, b, activation, dropout_p);
  const Dropout d = dropout_for(dropout_p, dropout_seed);
  const auto type = x.scalar_type();
  at::parallel_for(0, m, row_grain(n), [&](int64_t begin, int64_t end) {
    if (type == at::kFloat) {
      forward_f32(a, begin, end, d);
    } else if (type == at::kBFloat16) {
      forward_bf16(a, begin, end, d);
    } else if (type == at::kHalf) {
      forward_f16(a, begin, end, d);
    } else {
      forward64(a, begin, end, d, b.const_data_ptr<double>());
    }
  });
  return y;
}

BiasActivationBackward bias_activation_backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::string& activation, double dropout_p,
                                                    const std::optional<at::Tensor>& dropout_seed) {
  const at::Tensor x = unit_columns(x_in);
  const at::Tensor dy = unit_columns(dy_in);
  const int64_t m = x.size(0), n = x.size(1);
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor dx = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return {dx, bias.has_value() ? at::zeros({n}, acc_opts) : at::empty({0}, acc_opts)};

  // Chunk c owns rows [c*m/chunks, (c+1)*m/chunks) and row c of the partial bias gradients: no two threads write
  // the same memory, and the partials are summed in chunk order, so the result depends only on `chunks`.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), at::divup(m, row_grain(n))));
  at::Tensor partial = bias.has_value() ? at::zeros({chunks, n}, acc_opts) : at::Tensor();
  const at::Tensor b = bias_row(bias, x);
  RowArgs a = row_args(x, dx, b, activation, dropout_p);
  a.dy = dy.const_data_ptr();
  a.dy_stride = row_stride(dy);
  const Dropout d = dropout_for(dropout_p, dropout_seed);
  const auto type = x.scalar_type();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * m / chunks, last = (c + 1) * m / chunks;
      RowArgs ac = a;
      if (type == at::kDouble) {
        backward64(ac, first, last, d, b.const_data_ptr<double>(),
                   partial.defined() ? partial.mutable_data_ptr<double>() + c * n : nullptr);
        continue;
      }
      float* chunk_db = partial.defined() ? partial.mutable_data_ptr<float>() + c * n : nullptr;
      // The bias gradient as a cascade: kSumRows rows summed into `block`, kSumRows blocks into `group`, the groups
      // into the chunk's row. A float32 running sum over all of a chunk's rows (thousands) carries an error that
      // many ulps; the cascade's grows with 2 kSumRows plus rows / kSumRows^2 instead.
      const int64_t width = chunk_db ? n : 0;
      std::vector<float> block(width), group(width);
      ac.db = chunk_db ? block.data() : nullptr;
      for (int64_t start = first, blocks = 1; start < last; start += kSumRows, ++blocks) {
        const int64_t stop = std::min(last, start + kSumRows);
        std::fill(block.begin(), block.end(), 0.f);
        if (type == at::kFloat) {
          backward_f32(ac, start, stop, d);
        } else if (type == at::kBFloat16) {
          backward_bf16(ac, start, stop, d);
        } else {
          backward_f16(ac, start, stop, d);
        }
        for (int64_t j = 0; j < width; ++j) group[j] += block[j];
        if (blocks % kSumRows == 0 || stop == last) {
          for (int64_t j = 0; j < width; ++j) chunk_db[j] += group[j];
          std::fill(group.begin(), group.end(), 0.f);
        }
      }
    }
  });
  return {dx, partial.defined() ? sum_partials(partial) : at::empty({0}, acc_opts)};
}

at::Tensor bias_activation_math_cpu(const at::Tensor& x_in, const std::string& name) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.is_cpu(), "x must be a float32 CPU tensor");
  TORCH_CHECK(name == "erfc" || name == "sigmoid", "name must be \"erfc\" or \"sigmoid\", got \"", name, "\"");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  (name == "erfc" ? erfc_rows : sigmoid_rows)(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), x.numel());
  return y;
}

}  // namespace fastenc
