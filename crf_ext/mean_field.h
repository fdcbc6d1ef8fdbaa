// Per-pixel math of the MAL mean-field CRF, shared by the CPU loop
// (mean_field_cpu.cpp) and the CUDA kernels (mean_field_cuda.cu).
//
// Everything that decides a number lives here, once: the colour distance,
// the pairwise kernel weight, the unary term, the message accumulation order
// and the sigmoid update.  The callers only decide *where* values are read
// from and written to.
//
// Definition (float32 throughout):
//   p   = clamp(prob, 1e-6, 1 - 1e-6)
//   u   = log(p) - log(1 - p)
//   k_ij = exp(-sum_c (I_ci - I_cj)^2 / (2 zeta^2))   j in the 8-neighbourhood,
//                                                     inside the crop only
//   Q0  = p, 0 outside the box mask
//   Q_i <- sigmoid(u_i + omega * sum_j k_ij (2 Q_j - 1)), 0 outside the box.
//
// Neighbour order k = 0..7 is (dy,dx) = (-1,-1) (-1,0) (-1,1) (0,-1) (0,1)
// (1,-1) (1,0) (1,1).  A neighbour outside the crop is represented by weight
// 0 and value 0; it then adds exactly -0.0 to the message, i.e. nothing.
//
// exp/log: mf_exp / mf_log below are branch-free float32 versions
// (Cody-Waite range reduction + polynomial, ~1 ulp, checked in tests).
// They are used instead of expf/logf on both sides so that (a) the CPU inner loop
// auto-vectorises (glibc expf does not without -ffast-math) and (b) the CPU
// and CUDA paths run the *same* exp code.  No fast-math anywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MF_HD __host__ __device__ __forceinline__
#else
#define MF_HD inline __attribute__((always_inline))
#endif

namespace mal_crf {

constexpr int kNumNbr = 8;
constexpr int kNumPlanes = 4;  // symmetric weights stored per pixel
constexpr float kProbEps = 1e-6f;

// ---- neighbourhood ---------------------------------------------------------
MF_HD int nbr_dy(int k) { return k < 3 ? -1 : (k < 5 ? 0 : 1); }
MF_HD int nbr_dx(int k) {
  // (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)
  return (k == 0 || k == 3 || k == 5) ? -1 : ((k == 1 || k == 6) ? 0 : 1);
}
MF_HD bool in_crop(int y, int x, int H, int W) {
  return y >= 0 && y < H && x >= 0 && x < W;
}

// Symmetric weight storage (k_ij == k_ji bit for bit: (a-b)^2 == (b-a)^2).
// Plane p of pixel i holds the weight to its "forward" neighbour
// nbr(p + 4): p=0 (0,1), p=1 (1,-1), p=2 (1,0), p=3 (1,1).
// Neighbour k < 4 is a backward neighbour j; its weight is plane 3-k *of j*.
// Neighbour k >= 4 is forward; its weight is plane k-4 of i itself.
MF_HD int weight_plane(int k) { return k < 4 ? 3 - k : k - 4; }
MF_HD bool weight_stored_at_neighbour(int k) { return k < 4; }

// ---- value types -----------------------------------------------------------
// The sweep's math (mf_exp_in_range .. update_in_range) is written once for a
// value type F: float (CUDA, and the CPU's scalar loops, which GCC vectorises)
// or, on the CPU, LaneF (kLanes floats in explicit vector registers).  Per
// type: bit casts, float -> int, and select(m, a, b) = m ? a : b (m: bool, or
// a LaneI of -1 / 0); load_value's tag argument picks the type loaded.
MF_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}
MF_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}
MF_HD int32_t to_int(float f) { return static_cast<int32_t>(f); }
MF_HD float select(bool m, float a, float b) { return m ? a : b; }
MF_HD float load_value(const float* p, float) { return *p; }

#if !defined(__CUDACC__)
// The CPU sweep's vector LaneF: one AVX-512 register, or four AVX2 registers
// on which GCC issues every operation back to back.  On Zen 3 the 8-wide
// sweep is bound by its dependency chains (message + exp + divide, ~90
// cycles): four chains in flight made it ~20% faster.  On Zen 5 (AVX-512)
// more than one register per operation was slower (2: +9%, 4: +29%).  Same
// operations in the same order as the float code: the same bits.
// kVector: floats per register; kLanes: floats per LaneF.
#if defined(__AVX512F__)
constexpr int kVector = 16, kLanes = kVector;
#else
constexpr int kVector = 8, kLanes = 4 * kVector;
#endif
typedef float LaneF __attribute__((vector_size(4 * kLanes)));
typedef int32_t LaneI __attribute__((vector_size(4 * kLanes)));
typedef float LaneFU __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
inline LaneF bits_to_float(LaneI i) { return reinterpret_cast<LaneF>(i); }
inline LaneI float_to_bits(LaneF f) { return reinterpret_cast<LaneI>(f); }
inline LaneI to_int(LaneF f) { return __builtin_convertvector(f, LaneI); }
inline LaneF load_value(const float* p, LaneF) {
  return *reinterpret_cast<const LaneFU*>(p);
}
inline LaneF select(LaneI m, LaneF a, LaneF b) {
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}
inline LaneF select(bool m, LaneF a, LaneF b) { return m ? a : b; }
#endif

MF_HD float fmin_(float a, float b) { return a < b ? a : b; }
MF_HD float fmax_(float a, float b) { return a > b ? a : b; }

// 2^n for an integral-valued n in [-126, 127], built from the exponent bits.
template <class F>
MF_HD F exp2i(F n) {
  return bits_to_float((to_int(n) + 127) << 23);
}

// Branch-free float32 exp for x in [-87.3, 88.3], where 2^n stays a normal
// number; outside that range the result is garbage, so callers either clamp
// (mf_exp) or prove the range (update_in_range).
template <class F>
MF_HD F mf_exp_in_range(F x) {
  // n = round(x / ln2) via the 1.5*2^23 trick (round-to-nearest).
  const float kShift = 12582912.0f;
  F t = x * 1.44269504088896341f + kShift;
  F n = t - kShift;
  // r = x - n ln2 with ln2 split in two (first part has 9 bits: n*kLn2Hi is
  // exact for |n| <= 128).
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // exp(r) on |r| <= ln2/2: 1 + r + r^2 * P(r)
  F p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  F y = p * (r * r) + r + 1.0f;
  return y * exp2i(n);
}

// exp for any x: clamped to [-87.3, 88.3] first, NaN to -87.3 (so a NaN colour
// distance gives a weight of ~0, and every weight stays in [0, 1]).  exp(x)
// for x < -87.3 returns ~1.2e-38 instead of a smaller value (irrelevant here:
// it is added to 1 or multiplies a weight).
MF_HD float mf_exp(float x) {
  return mf_exp_in_range(fmin_(fmax_(x, -87.3f), 88.3f));
}

// Branch-free float32 natural log for positive normal finite x (the only
// inputs here: clamped probabilities).  x = m 2^e with m in [sqrt(.5),sqrt(2)),
// log(x) = e ln2 + log1p(m - 1) by a degree-9 polynomial; <= 2 ulp.
MF_HD float mf_log(float x) {
  const int32_t i = float_to_bits(x);
  int32_t e = ((i >> 23) & 0xff) - 126;                 // x = f 2^e, f in [.5,1)
  float f = bits_to_float((i & 0x007fffff) | 0x3f000000);
  const bool lo = f < 0.707106781186547524f;
  e = lo ? e - 1 : e;
  const float m = lo ? (f + f) - 1.0f : f - 1.0f;       // exact
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = m + y;
  r = r + fe * 0.693359375f;
  return r;
}

MF_HD float mf_sigmoid(float x) { return 1.0f / (1.0f + mf_exp(-x)); }

// ---- unary / init ----------------------------------------------------------
MF_HD float clamp_prob(float p) {
  return fmin_(fmax_(p, kProbEps), 1.0f - kProbEps);
}
MF_HD float unary(float prob) {
  const float p = clamp_prob(prob);
  return mf_log(p) - mf_log(1.0f - p);
}
MF_HD float initial_q(float prob, bool inside) {
  return inside ? clamp_prob(prob) : 0.0f;
}

// ---- pairwise --------------------------------------------------------------
// One channel of the colour distance: d + (a - b)^2.
MF_HD float colour_term(float d, float a, float b) {
  const float t = a - b;
  return d + t * t;
}
// Colour distance between pixels at flat offsets a and b of a planar
// [C][plane_stride] float image, summed in channel order.
MF_HD float colour_dist2(const float* img, int64_t plane_stride, int C,
                         int64_t a, int64_t b) {
  float d = 0.0f;
  for (int c = 0; c < C; ++c) {
    d = colour_term(d, img[c * plane_stride + a], img[c * plane_stride + b]);
  }
  return d;
}
// inv_two_zeta2 = 1 / (2 zeta^2)
MF_HD float kernel_weight(float dist2, float inv_two_zeta2) {
  return mf_exp(-dist2 * inv_two_zeta2);
}
// Weight of pixel (y,x) to its neighbour k (0 outside the crop).
MF_HD float pixel_weight(const float* img, int C, int H, int W, int y, int x,
                         int k, float inv_two_zeta2) {
  const int ny = y + nbr_dy(k), nx = x + nbr_dx(k);
  if (!in_crop(ny, nx, H, W)) return 0.0f;
  const int64_t HW = static_cast<int64_t>(H) * W;
  return kernel_weight(
      colour_dist2(img, HW, C, static_cast<int64_t>(y) * W + x,
                   static_cast<int64_t>(ny) * W + nx),
      inv_two_zeta2);
}

// ---- message + update ------------------------------------------------------
// Q in {0..1} -> "spin" 2Q - 1 in {-1..1} (a deterministic function of Q, so
// a caller may store spins instead of Q without changing any result).
template <class F>
MF_HD F spin(F q) { return 2.0f * q - 1.0f; }
template <class F>
MF_HD F accumulate_spin(F acc, F w, F s) { return acc + w * s; }
MF_HD float accumulate(float acc, float w, float q) {
  return accumulate_spin(acc, w, spin(q));
}
// w[k], q[k] in neighbour order; outside-crop entries must be w=0, q=0.
MF_HD float message(const float* w, const float* q) {
  float acc = 0.0f;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kNumNbr; ++k) acc = accumulate(acc, w[k], q[k]);
  return acc;
}
MF_HD float update(float u, float omega, float msg, bool inside) {
  const float q = mf_sigmoid(u + omega * msg);
  return inside ? q : 0.0f;
}
// |u| <= log((1 - 1e-6) / 1e-6) < 13.82 (clamped prob) and |msg| <= 8 (weights
// in [0, 1], spins in [-1, 1]), so for |omega| <= kOmegaInRange the sigmoid's
// argument stays inside mf_exp_in_range's range whatever the inputs: the clamp
// in update() is then a no-op, and update_in_range() returns exactly the same
// value without it (the CPU loop uses it: the clamp vectorises to 6 compare /
// blend instructions, ~15% of the update).
constexpr float kOmegaInRange = 9.0f;  // 13.82 + 8 * 9 = 85.82 < 87.3
MF_HD bool omega_in_range(float omega) {
  return omega >= -kOmegaInRange && omega <= kOmegaInRange;
}
// F: float with a bool `inside`, or LaneF with a LaneI mask (-1 inside, 0 outside).
template <class F, class M>
MF_HD F update_in_range(F u, float omega, F msg, M inside) {
  return select(inside, 1.0f / (1.0f + mf_exp_in_range(-(u + omega * msg))), F{});
}

// Gather the 8 neighbour values of (y,x) from a [H][W] buffer (0 outside).
MF_HD void gather_q(const float* q, int H, int W, int y, int x, float* out) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kNumNbr; ++k) {
    const int ny = y + nbr_dy(k), nx = x + nbr_dx(k);
    out[k] = in_crop(ny, nx, H, W) ? q[ny * W + nx] : 0.0f;
  }
}
// Gather the 8 weights of (y,x) from symmetric planes: plane p of pixel i is
// at planes[p * plane_stride + i].  0 outside the crop.
MF_HD void gather_w(const float* planes, int64_t plane_stride, int H, int W,
                    int y, int x, float* out) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kNumNbr; ++k) {
    const int ny = y + nbr_dy(k), nx = x + nbr_dx(k);
    const int64_t at = weight_stored_at_neighbour(k)
                           ? static_cast<int64_t>(ny) * W + nx
                           : static_cast<int64_t>(y) * W + x;
    out[k] = in_crop(ny, nx, H, W)
                 ? planes[weight_plane(k) * plane_stride + at]
                 : 0.0f;
  }
}

}  // namespace mal_crf
