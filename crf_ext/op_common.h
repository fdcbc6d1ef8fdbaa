// Host-side argument checking and input normalisation for mal::mean_field,
// shared by the CPU and CUDA kernels (both must reject exactly the same).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdio>
#include <limits>
#include <optional>
#include <string>

namespace mal_crf {

// Numbers reach the messages as strings made here, never through std::ostream: with PyTorch 2.11's
// wheel and an extension built by GCC 13.3 (Ubuntu 24.04, the H200 in BENCHMARKS.md), inserting an
// integer or a double into a stream inside the extension crashed the process (strings were fine),
// so every TORCH_CHECK with a number in it was a segfault instead of an error.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
inline std::string shape(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + num(s[i]);
  return out + "]";
}

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
inline bool supported_mask(at::ScalarType t) {
  return t == at::kBool || t == at::kByte || t == at::kFloat ||
         t == at::kHalf || t == at::kBFloat16;
}

struct Prepared {
  at::Tensor image;  // [B,C,H,W] float32 contiguous
  at::Tensor prob;   // [B,H,W] float32 contiguous
  at::Tensor mask;   // [B,H,W] bool contiguous, or undefined (= all inside)
  int64_t B, C, H, W;
  float inv_two_zeta2;
};

inline Prepared prepare_inputs(const at::Tensor& image, const at::Tensor& prob,
                               const std::optional<at::Tensor>& box_mask,
                               int64_t iters, double zeta, double omega,
                               c10::DeviceType expected) {
  TORCH_CHECK(image.dim() == 4,
              "mal::mean_field: image must be [B,C,H,W], got ", num(image.dim()),
              "-d tensor of shape ", shape(image.sizes()));
  TORCH_CHECK(prob.dim() == 3,
              "mal::mean_field: prob must be [B,H,W], got ", num(prob.dim()),
              "-d tensor of shape ", shape(prob.sizes()));
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2),
                W = image.size(3);
  TORCH_CHECK(prob.size(0) == B && prob.size(1) == H && prob.size(2) == W,
              "mal::mean_field: prob shape ", shape(prob.sizes()),
              " does not match image shape ", shape(image.sizes()),
              " (expected [B,H,W] = ", shape({B, H, W}), ")");
  TORCH_CHECK(supported_float(image.scalar_type()),
              "mal::mean_field: image dtype must be float32, float16 or "
              "bfloat16, got ", image.scalar_type());
  TORCH_CHECK(supported_float(prob.scalar_type()),
              "mal::mean_field: prob dtype must be float32, float16 or "
              "bfloat16, got ", prob.scalar_type());
  TORCH_CHECK(image.device().type() == expected,
              "mal::mean_field: expected image on ", expected, ", got ",
              image.device());
  TORCH_CHECK(prob.device() == image.device(),
              "mal::mean_field: prob is on ", prob.device(),
              " but image is on ", image.device(),
              "; all inputs must be on the same device");
  TORCH_CHECK(iters >= 0, "mal::mean_field: iters must be >= 0, got ", num(iters));
  TORCH_CHECK(zeta > 0.0 && std::isfinite(zeta),
              "mal::mean_field: zeta must be a finite number > 0, got ", num(zeta));
  TORCH_CHECK(std::isfinite(omega),
              "mal::mean_field: omega must be finite, got ", num(omega));
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max() &&
                  H <= std::numeric_limits<int32_t>::max() &&
                  W <= std::numeric_limits<int32_t>::max() &&
                  C <= std::numeric_limits<int32_t>::max(),
              "mal::mean_field: crop too large (H*W and C must fit in int32), "
              "got image shape ", shape(image.sizes()));

  Prepared out;
  out.B = B; out.C = C; out.H = H; out.W = W;
  out.inv_two_zeta2 = static_cast<float>(1.0 / (2.0 * zeta * zeta));
  out.image = image.to(at::kFloat).contiguous();
  out.prob = prob.to(at::kFloat).contiguous();
  if (box_mask.has_value() && box_mask->defined()) {
    const at::Tensor& m = *box_mask;
    TORCH_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == H &&
                    m.size(2) == W,
                "mal::mean_field: box_mask must be [B,H,W] = ", shape({B, H, W}),
                ", got shape ", shape(m.sizes()));
    TORCH_CHECK(supported_mask(m.scalar_type()),
                "mal::mean_field: box_mask dtype must be bool, uint8, "
                "float32, float16 or bfloat16, got ", m.scalar_type());
    TORCH_CHECK(m.device() == image.device(),
                "mal::mean_field: box_mask is on ", m.device(),
                " but image is on ", image.device(),
                "; all inputs must be on the same device");
    out.mask = (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous();
  }
  return out;
}

}  // namespace mal_crf
