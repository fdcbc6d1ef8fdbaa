// CPU kernel + schema of mal::mean_field (see mean_field.h for the math).
//
// Work split: when there are at least as many crops as threads (or crops are
// small) every thread solves whole crops, all iterations, in a private
// workspace that stays in L2 (128x128: ~400 KB).  Otherwise each crop is
// solved with the rows of every iteration split across threads (the end of
// each at::parallel_for is the barrier between synchronous iterations).
//
// Inner loop: zero-padded buffers, plain row pointers, vectorised by GCC
// (mf_exp / mf_log are branch-free).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mean_field.h"
#include "op_common.h"

namespace mal_crf {
namespace {

struct Crop {
  const float* img;   // [C][H][W]
  const float* prob;  // [H][W]
  const bool* mask;   // [H][W] or nullptr
  int C, H, W;
  float inv_two_zeta2, omega;
};

// Fast path layout: weight planes and the two iterate buffers are padded
// with a 1-pixel border of zeros ((H+2) x (W+2)), so every pixel is
// "interior": a neighbour outside the crop has weight 0 and adds exactly 0 to
// the message.  The iterate buffers hold spins s = spin(Q) = 2Q - 1 (exactly
// the value every reader would compute from Q), the last iteration writes Q.
struct Workspace {
  std::vector<float> u, w, qa, qb;
  // Box mask as int32 lanes (-1 inside, 0 outside: update_in_range's mask
  // form, which GCC vectorises; a bool mask is not).
  std::vector<int32_t> inside;
  // Per row, the columns [lo, hi) that hold box pixels: Q = 0 (spin -1) outside the box never
  // changes, so the update only sweeps the span (training crops are mostly box).  holes: the
  // span has pixels outside the mask (never for a box), so the update must read the mask.
  std::vector<int> lo, hi;
  std::vector<uint8_t> holes;
  int64_t H = -1, W = -1;
  void resize(int64_t h, int64_t w_) {
    if (h == H && w_ == W) return;  // borders are never written: stay 0
    H = h; W = w_;
    const int64_t HWp = (h + 2) * (w_ + 2);
    u.assign(h * w_, 0.0f);
    w.assign(kNumPlanes * HWp, 0.0f);
    qa.assign(HWp, 0.0f);
    qb.assign(HWp, 0.0f);
    inside.assign(h * w_, 0);
    lo.assign(h, 0);
    hi.assign(h, 0);
    holes.assign(h, 0);
  }
};

// Stores of one float / of kLanes floats at any float alignment (loads:
// load_value in mean_field.h).
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, LaneF v) { *reinterpret_cast<LaneFU*>(p) = v; }
// The box mask (Workspace::inside) of one pixel / of kLanes pixels, in
// update_in_range's form.
inline bool inside_mask(const int32_t* m, float) { return *m != 0; }
inline LaneI inside_mask(const int32_t* m, LaneF) {
  typedef int32_t LaneIU __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
  return *reinterpret_cast<const LaneIU*>(m);
}

// Unary, initial iterate (into padded q0) and the 4 symmetric weight planes
// (padded) of rows [y0,y1).  Equivalent to unary()/initial_q()/pixel_weight()
// per pixel, written as row loops that vectorise.  kC: the channel count
// when known at compile time (3: RGB), else 0.
template <int kC>
void prepare_rows(const Crop& c, Workspace& ws, float* __restrict q0,
                  float* __restrict q1, int64_t y0, int64_t y1) {
  const int H = c.H, W = c.W, nc = kC > 0 ? kC : c.C;
  const int64_t HW = static_cast<int64_t>(H) * W, Wp = W + 2,
                HWp = (H + 2) * Wp;
  float* __restrict u = ws.u.data();
  float* __restrict w = ws.w.data();
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(c.mask);
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t r = y * W, rp = (y + 1) * Wp + 1;
    const float* __restrict pr = c.prob + r;
    float* __restrict qr = q0 + rp;
    if (mask) {
      const uint8_t* __restrict mr = mask + r;
#pragma omp simd
      for (int x = 0; x < W; ++x) {
        u[r + x] = unary(pr[x]);
        qr[x] = spin(initial_q(pr[x], mr[x] != 0));
        ws.inside[r + x] = mr[x] != 0 ? -1 : 0;
      }
      int lo = 0, hi = W;
      while (lo < W && mr[lo] == 0) ++lo;
      while (hi > lo && mr[hi - 1] == 0) --hi;
      ws.lo[y] = lo;
      ws.hi[y] = hi;
      ws.holes[y] = std::find(mr + lo, mr + hi, 0) != mr + hi;
      // Both ping-pong buffers hold the constant spin -1 outside the span.
      std::memcpy(q1 + rp, qr, sizeof(float) * W);
    } else {
      ws.lo[y] = 0;
      ws.hi[y] = W;
      ws.holes[y] = 0;
#pragma omp simd
      for (int x = 0; x < W; ++x) {
        u[r + x] = unary(pr[x]);
        qr[x] = spin(initial_q(pr[x], true));
      }
    }
    for (int pl = 0; pl < kNumPlanes; ++pl) {
      const int k = pl + 4;  // forward neighbour of plane pl
      const int dy = nbr_dy(k), dx = nbr_dx(k);
      const int64_t ny = y + dy;
      float* __restrict wr = w + pl * HWp + rp;
      int x_lo = dx < 0 ? -dx : 0, x_hi = dx > 0 ? W - dx : W;
      if (ny >= H || x_lo >= x_hi) x_lo = x_hi = 0;
      for (int x = 0; x < x_lo; ++x) wr[x] = 0.0f;
      for (int x = x_hi; x < W; ++x) wr[x] = 0.0f;
      // pixel_weight() of every pixel of the row (the channel loop of
      // colour_dist2() unrolled for kC > 0).
      const int64_t nr = ny * W + dx;
      const auto weights = [&](int a, int b) __attribute__((always_inline)) {
#pragma omp simd
        for (int x = a; x < b; ++x)
          wr[x] = kernel_weight(colour_dist2(c.img, HW, nc, r + x, nr + x),
                                c.inv_two_zeta2);
      };
      // A span that is not a whole number of vectors (W - 1 for 3 of the 4
      // planes) would end in a slow scalar tail: whole vectors, then the
      // last kVector pixels again (rewriting the same values).
      const int n = x_hi - x_lo, n_whole = n / kVector * kVector;
      if (n < kVector) {
        weights(x_lo, x_hi);
      } else {
        weights(x_lo, x_lo + n_whole);
        if (n_whole < n) weights(x_hi - kVector, x_hi);
      }
    }
  }
}

// The three padded spin rows around row y and the weight planes, at column 0.
struct RowView {
  const float *sm, *sc, *sp;      // spins of rows y-1, y, y+1
  const float *p0, *p1, *p2, *p3;  // weight planes
  int64_t r0, r1;                  // padded offsets of rows y-1, y
};

// Message of pixel x (F = float) or pixels [x, x + kLanes) (F = LaneF).  Same
// neighbour order / weight planes as gather_w + gather_q + message in
// mean_field.h (k<4: backward neighbour, plane 3-k stored at the neighbour;
// k>=4: forward, plane k-4 stored at this pixel), written as an explicit
// fold because GCC does not loop-vectorise through message()'s arrays.
template <class F>
inline __attribute__((always_inline)) F row_message(const RowView& v, int x) {
  const int64_t r0 = v.r0 + x, r1 = v.r1 + x;
  const auto ld = [](const float* p) { return load_value(p, F{}); };
  F acc = F{};
  acc = accumulate_spin(acc, ld(v.p3 + r0 - 1), ld(v.sm + x - 1));  // -1,-1
  acc = accumulate_spin(acc, ld(v.p2 + r0), ld(v.sm + x));          // -1, 0
  acc = accumulate_spin(acc, ld(v.p1 + r0 + 1), ld(v.sm + x + 1));  // -1,+1
  acc = accumulate_spin(acc, ld(v.p0 + r1 - 1), ld(v.sc + x - 1));  //  0,-1
  acc = accumulate_spin(acc, ld(v.p0 + r1), ld(v.sc + x + 1));      //  0,+1
  acc = accumulate_spin(acc, ld(v.p1 + r1), ld(v.sp + x - 1));      // +1,-1
  acc = accumulate_spin(acc, ld(v.p2 + r1), ld(v.sp + x));          // +1, 0
  acc = accumulate_spin(acc, ld(v.p3 + r1), ld(v.sp + x + 1));      // +1,+1
  return acc;
}

// New Q of pixel(s) x, written to out as a spin (kSpinOut) or as Q.
template <class F, bool kMask, bool kInRange, bool kSpinOut>
inline __attribute__((always_inline)) void update_at(
    const RowView& v, const float* ur, const int32_t* mr, float omega,
    float* out, int x) {
  const F acc = row_message<F>(v, x);
  const F u = load_value(ur + x, F{});
  F q;
  if constexpr (kInRange) {
    if constexpr (kMask)
      q = update_in_range(u, omega, acc, inside_mask(mr + x, F{}));
    else
      q = update_in_range(u, omega, acc, true);
  } else {
    q = update(u, omega, acc, kMask ? mr[x] != 0 : true);
  }
  store(out + x, kSpinOut ? spin(q) : q);
}

// One row of one iteration over the box span [lo, hi) (outside it Q stays
// 0), kLanes pixels at a time; a span that is not a whole number of LaneFs
// ends with the last kLanes pixels again (the update reads only cur, so they
// are rewritten with the same values).  Spans shorter than kLanes, and the
// clamped update (|omega| > kOmegaInRange, rare), go one pixel at a time
// (vectorised by GCC).
template <bool kMask, bool kInRange, bool kSpinOut>
void sweep_row(const RowView& v, const float* ur, const int32_t* mr,
               float omega, float* out, int lo, int hi) {
  if constexpr (kInRange) {
    if (hi - lo >= kLanes) {
      int x = lo;
      for (; x + kLanes <= hi; x += kLanes)
        update_at<LaneF, kMask, true, kSpinOut>(v, ur, mr, omega, out, x);
      if (x < hi)
        update_at<LaneF, kMask, true, kSpinOut>(v, ur, mr, omega, out, hi - kLanes);
      return;
    }
  }
#pragma omp simd
  for (int x = lo; x < hi; ++x)
    update_at<float, kMask, kInRange, kSpinOut>(v, ur, mr, omega, out, x);
}

// One row of one iteration.  cur/nxt: padded spin buffers.  If q_out is set
// (last iteration) Q itself is written there ([H][W] row y) instead.
template <bool kMask, bool kInRange>
void step_row(const Crop& c, const Workspace& ws, const float* cur,
              float* nxt, float* q_out, int y) {
  const int W = c.W;
  const int64_t Wp = W + 2, HWp = (c.H + 2) * Wp;
  RowView v;
  v.r0 = y * Wp + 1;  // padded row starts (column 0) of rows y-1, y
  v.r1 = v.r0 + Wp;
  v.sm = cur + v.r0;
  v.sc = cur + v.r1;
  v.sp = cur + v.r1 + Wp;
  const float* w = ws.w.data();
  v.p0 = w;
  v.p1 = w + HWp;
  v.p2 = w + 2 * HWp;
  v.p3 = w + 3 * HWp;
  const float* ur = ws.u.data() + static_cast<int64_t>(y) * W;
  const int32_t* mr =
      kMask ? ws.inside.data() + static_cast<int64_t>(y) * W : nullptr;
  const int lo = ws.lo[y], hi = ws.hi[y];
  if (q_out == nullptr) {
    sweep_row<kMask, kInRange, true>(v, ur, mr, c.omega, nxt + v.r1, lo, hi);
  } else {
    float* out = q_out + static_cast<int64_t>(y) * W;
    std::fill(out, out + lo, 0.0f);
    std::fill(out + hi, out + W, 0.0f);
    sweep_row<kMask, kInRange, false>(v, ur, mr, c.omega, out, lo, hi);
  }
}

// Solve one crop into `out` [H][W].  `parallel_rows` splits the rows of each
// phase across threads (the end of each parallel_for is the barrier).
void solve_crop_fast(const Crop& c, int64_t iters, float* out, Workspace& ws,
                     bool parallel_rows) {
  const int64_t H = c.H, W = c.W;
  ws.resize(H, W);
  float* cur = ws.qa.data();
  float* nxt = ws.qb.data();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(W, 1));
  auto rows = [&](const auto& fn) {
    if (parallel_rows)
      at::parallel_for(0, H, grain, fn);
    else
      fn(0, H);
  };
  rows([&](int64_t y0, int64_t y1) {
    if (c.C == 3)
      prepare_rows<3>(c, ws, cur, nxt, y0, y1);
    else
      prepare_rows<0>(c, ws, cur, nxt, y0, y1);
  });
  const bool in_range = omega_in_range(c.omega);
  auto step = [&](int y, float* q_out) {
    if (ws.holes[y])
      in_range ? step_row<true, true>(c, ws, cur, nxt, q_out, y)
               : step_row<true, false>(c, ws, cur, nxt, q_out, y);
    else
      in_range ? step_row<false, true>(c, ws, cur, nxt, q_out, y)
               : step_row<false, false>(c, ws, cur, nxt, q_out, y);
  };
  for (int64_t t = 0; t < iters; ++t) {
    float* q_out = (t == iters - 1) ? out : nullptr;
    rows([&](int64_t y0, int64_t y1) {
      for (int64_t y = y0; y < y1; ++y) step(static_cast<int>(y), q_out);
    });
    std::swap(cur, nxt);
  }
  if (iters == 0) {  // Q0 = (s0 + 1) / 2 is not exact: recompute it
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        out[y * W + x] = initial_q(c.prob[y * W + x],
                                   c.mask == nullptr || c.mask[y * W + x]);
  }
}

// "emulate" path (env MAL_CRF_CPU_PATH=emulate; tests only): the exact
// per-pixel code of the CUDA smem/global kernels -- unpadded planes from
// pixel_weight(), bounds-checked gather_w()/gather_q(), message(), update()
// -- so that the CUDA indexing is exercised on machines without a GPU.
void solve_crop_emulate(const Crop& c, int64_t iters, float* out) {
  const int H = c.H, W = c.W;
  const int64_t HW = static_cast<int64_t>(H) * W;
  std::vector<float> planes(kNumPlanes * HW), u(HW), qa(HW), qb(HW);
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const int64_t p = static_cast<int64_t>(y) * W + x;
      for (int pl = 0; pl < kNumPlanes; ++pl)
        planes[pl * HW + p] =
            pixel_weight(c.img, c.C, H, W, y, x, pl + 4, c.inv_two_zeta2);
      u[p] = unary(c.prob[p]);
      qa[p] = initial_q(c.prob[p], c.mask == nullptr || c.mask[p]);
    }
  float* cur = qa.data();
  float* nxt = qb.data();
  for (int64_t t = 0; t < iters; ++t) {
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        const int64_t p = static_cast<int64_t>(y) * W + x;
        float wk[kNumNbr], q[kNumNbr];
        gather_w(planes.data(), HW, H, W, y, x, wk);
        gather_q(cur, H, W, y, x, q);
        nxt[p] = update(u[p], c.omega, message(wk, q),
                        c.mask == nullptr || c.mask[p]);
      }
    std::swap(cur, nxt);
  }
  std::copy(cur, cur + HW, out);
}

// Workspaces are reused per thread for crops up to 256x256 (~2 MB) to avoid
// page-faulting fresh memory on every call; larger ones are per call.
constexpr int64_t kCachedWorkspacePixels = 256 * 256;
Workspace& thread_workspace() {
  static thread_local Workspace ws;
  return ws;
}

bool emulate_requested() {
  const char* e = std::getenv("MAL_CRF_CPU_PATH");
  return e != nullptr && std::strcmp(e, "emulate") == 0;
}

at::Tensor mean_field_cpu(const at::Tensor& image, const at::Tensor& prob,
                          const std::optional<at::Tensor>& box_mask,
                          int64_t iters, double zeta, double omega) {
  Prepared P = prepare_inputs(image, prob, box_mask, iters, zeta, omega,
                              c10::DeviceType::CPU);
  at::Tensor out = at::empty({P.B, P.H, P.W}, P.prob.options());
  const int64_t HW = P.H * P.W;
  if (P.B == 0 || HW == 0) return out;

  const float* img = P.image.const_data_ptr<float>();
  const float* prb = P.prob.const_data_ptr<float>();
  const bool* msk = P.mask.defined() ? P.mask.const_data_ptr<bool>() : nullptr;
  float* o = out.mutable_data_ptr<float>();
  auto crop = [&](int64_t b) {
    Crop c;
    c.img = img + b * P.C * HW;
    c.prob = prb + b * HW;
    c.mask = msk ? msk + b * HW : nullptr;
    c.C = static_cast<int>(P.C);
    c.H = static_cast<int>(P.H);
    c.W = static_cast<int>(P.W);
    c.inv_two_zeta2 = P.inv_two_zeta2;
    c.omega = static_cast<float>(omega);
    return c;
  };
  const int64_t nthreads = at::get_num_threads();
  if (emulate_requested()) {
    at::parallel_for(0, P.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        solve_crop_emulate(crop(b), iters, o + b * HW);
    });
  } else if (P.B >= nthreads || HW < 4096) {
    at::parallel_for(0, P.B, 1, [&](int64_t b0, int64_t b1) {
      Workspace local;
      Workspace& ws = HW <= kCachedWorkspacePixels ? thread_workspace() : local;
      for (int64_t b = b0; b < b1; ++b)
        solve_crop_fast(crop(b), iters, o + b * HW, ws, false);
    });
  } else {
    Workspace local;
    Workspace& ws = HW <= kCachedWorkspacePixels ? thread_workspace() : local;
    for (int64_t b = 0; b < P.B; ++b)
      solve_crop_fast(crop(b), iters, o + b * HW, ws, true);
  }
  return out;
}

// Autograd: the op produces labels and has no derivative.  Instead of the
// default fallback (which would attach a grad_fn that fails in backward) we
// redispatch below autograd, so the output never requires grad.
at::Tensor mean_field_autograd(const at::Tensor& image, const at::Tensor& prob,
                               const std::optional<at::Tensor>& box_mask,
                               int64_t iters, double zeta, double omega) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mal::mean_field", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&,
                                         int64_t, double, double)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(image, prob, box_mask, iters, zeta, omega);
}

}  // namespace
}  // namespace mal_crf

TORCH_LIBRARY(mal, m) {
  m.def(
      "mean_field(Tensor image, Tensor prob, Tensor? box_mask, int iters, "
      "float zeta=0.5, float omega=2.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(mal, CPU, m) {
  m.impl("mean_field", &mal_crf::mean_field_cpu);
}

TORCH_LIBRARY_IMPL(mal, Autograd, m) {
  m.impl("mean_field", &mal_crf::mean_field_autograd);
}
