// CUDA kernels of mal::mean_field (math: mean_field.h, shared with the CPU).
// The tests also run this file, kernels and launcher, on the CPU through the
// emulator in cuda_emu.h (cuda_emu.cpp).
//
// Three paths, chosen per call from the crop size (override for testing:
// env MAL_CRF_CUDA_PATH=reg|smem|global; ignored where it does not apply).
//
//  reg    H*W <= 4096 (e.g. 64x64): one thread block per crop, ALL iterations
//         in one launch.  Each thread owns up to 8 pixels (p = tid + j*blockDim)
//         and keeps their unary + 8 weights in registers (computed once from
//         the image); the iterate ping-pongs between two float buffers in
//         shared memory (<= 32 KB), one __syncthreads per iteration.
//
//  smem   2*H*W*4 bytes <= the opt-in shared-memory limit (227 KB on H100,
//         163 KB on A100: 128x128 needs 128 KB): one block per crop, all
//         iterations fused, Q ping-pong in shared memory.  The unary + 4
//         symmetric weight planes (20 B/pixel) are computed once by a
//         prepare kernel into a global workspace and re-read every
//         iteration: they do not fit on one SM (128x128 x 9 floats = 590 KB
//         vs 256 KB registers + 227 KB smem), but they are L2-resident
//         (B=32 128x128: 10 MB < 50 MB L2), so iterations cost L2, not HBM.
//
//  global everything else (e.g. 512x512: the iterate alone is 1 MB/crop and
//         cannot stay in one SM).  Prepare kernel once (reads image + prob
//         once, writes unary + 4 weight planes), then one launch per
//         iteration over all pixels of all crops with a global-memory Q
//         ping-pong.  Per iteration it moves 28 B/pixel (Q in+out, unary, 4
//         planes; neighbour reads hit L1/L2), which for B=32 512x512 is
//         ~235 MB ~= 70 us of HBM at 3.35 TB/s, so the ~2-3 us launch
//         overhead per iteration is noise and the launch boundary is the
//         grid-wide barrier the synchronous update needs.  We chose this over
//         (a) a cooperative persistent grid (grid.sync() + co-residency
//         limits, same traffic) and (b) temporal blocking with halo tiles
//         (fewer HBM passes but redundant halo compute and much more code);
//         (b) is the next step if 512x512 iterations ever dominate.
// Not ATen/ATen.h: a fresh test run compiles this file (emulated build), and
// the narrower headers take a quarter off that.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "mean_field.h"
#include "op_common.h"

#if defined(MAL_CRF_CUDA_EMU)
// Tests: this file compiled as host C++ on the emulator (cuda_emu.cpp), on
// CPU tensors.
#include "cuda_emu.h"
namespace mf_gpu = cuda_emu;
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#else
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers, which minimal toolkits (nvcc + cudart only) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
namespace mf_gpu = c10::cuda;
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
// Launches and dynamic shared memory through macros, which the emulator
// defines its own way.
#define MF_LAUNCH(kernel, grid, block, smem, stream) \
  kernel<<<grid, block, smem, stream>>>
#define MF_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace mal_crf {
namespace {

constexpr int kRegThreads = 512;   // max threads of the `reg` kernel
constexpr int kRegMaxPPT = 8;      // pixels per thread held in registers
constexpr int kRegMaxPixels = kRegThreads * kRegMaxPPT;  // 4096
constexpr int kSmemThreads = 1024;
constexpr int kGlobalThreads = 256;
constexpr int kWsPlanes = kNumPlanes + 1;  // 4 weight planes + unary

// ---------------------------------------------------------------- reg path
template <int PPT>
__global__ void __launch_bounds__(kRegThreads)
    mf_reg_kernel(const float* __restrict__ img, const float* __restrict__ prob,
                  const bool* __restrict__ mask, float* __restrict__ out,
                  int C, int H, int W, int iters, float inv_two_zeta2,
                  float omega) {
  MF_DYNAMIC_SHARED(float, smem);
  const int HW = H * W;
  float* cur = smem;
  float* nxt = smem + HW;
  const int64_t b = blockIdx.x;
  img += b * C * HW;
  prob += b * HW;
  out += b * HW;
  if (mask != nullptr) mask += b * HW;

  float u[PPT];
  float w[PPT][kNumNbr];
  bool inside[PPT];
  int pos[PPT];  // (y << 16) | x; H, W <= kRegMaxPixels < 65536 here
#pragma unroll
  for (int j = 0; j < PPT; ++j) {
    const int p = threadIdx.x + j * blockDim.x;
    const bool valid = p < HW;
    const int y = valid ? p / W : 0;
    const int x = valid ? p - y * W : 0;
    pos[j] = (y << 16) | x;
    inside[j] = valid && (mask == nullptr || mask[p]);
    u[j] = 0.0f;
#pragma unroll
    for (int k = 0; k < kNumNbr; ++k) w[j][k] = 0.0f;
    if (valid) {
      const float pr = prob[p];
      u[j] = unary(pr);
      cur[p] = initial_q(pr, inside[j]);
#pragma unroll
      for (int k = 0; k < kNumNbr; ++k)
        w[j][k] = pixel_weight(img, C, H, W, y, x, k, inv_two_zeta2);
    }
  }
  __syncthreads();
  for (int t = 0; t < iters; ++t) {
#pragma unroll
    for (int j = 0; j < PPT; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < HW) {
        float q[kNumNbr];
        gather_q(cur, H, W, pos[j] >> 16, pos[j] & 0xffff, q);
        nxt[p] = update(u[j], omega, message(w[j], q), inside[j]);
      }
    }
    __syncthreads();  // all reads of `cur` done before it is overwritten
    float* tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
#pragma unroll
  for (int j = 0; j < PPT; ++j) {
    const int p = threadIdx.x + j * blockDim.x;
    if (p < HW) out[p] = cur[p];
  }
}

// ------------------------------------------------------- workspace prepare
// ws: [B][kWsPlanes][HW]: planes 0..3 weights, plane 4 unary.
// q0 (optional): [B][HW] initial iterate.
__global__ void mf_prepare_kernel(const float* __restrict__ img,
                                  const float* __restrict__ prob,
                                  const bool* __restrict__ mask,
                                  float* __restrict__ ws,
                                  float* __restrict__ q0, int64_t B, int C,
                                  int H, int W, float inv_two_zeta2) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t total = B * HW;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       g < total; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = g / HW;
    const int p = static_cast<int>(g - b * HW);
    const int y = p / W, x = p - (p / W) * W;
    const float* im = img + b * C * HW;
    float* wb = ws + b * kWsPlanes * HW;
#pragma unroll
    for (int pl = 0; pl < kNumPlanes; ++pl)
      wb[pl * HW + p] = pixel_weight(im, C, H, W, y, x, pl + 4, inv_two_zeta2);
    const float pr = prob[g];
    wb[kNumPlanes * HW + p] = unary(pr);
    if (q0 != nullptr) q0[g] = initial_q(pr, mask == nullptr || mask[g]);
  }
}

// --------------------------------------------------------------- smem path
__global__ void __launch_bounds__(kSmemThreads)
    mf_smem_kernel(const float* __restrict__ ws, const float* __restrict__ prob,
                   const bool* __restrict__ mask, float* __restrict__ out,
                   int H, int W, int iters, float omega) {
  MF_DYNAMIC_SHARED(float, smem);
  const int HW = H * W;
  float* cur = smem;
  float* nxt = smem + HW;
  const int64_t b = blockIdx.x;
  ws += b * kWsPlanes * HW;
  prob += b * HW;
  out += b * HW;
  if (mask != nullptr) mask += b * HW;
  const float* u = ws + static_cast<int64_t>(kNumPlanes) * HW;

  for (int p = threadIdx.x; p < HW; p += blockDim.x)
    cur[p] = initial_q(prob[p], mask == nullptr || mask[p]);
  __syncthreads();
  for (int t = 0; t < iters; ++t) {
    for (int p = threadIdx.x; p < HW; p += blockDim.x) {
      const int y = p / W, x = p - (p / W) * W;
      float wk[kNumNbr], q[kNumNbr];
      gather_w(ws, HW, H, W, y, x, wk);
      gather_q(cur, H, W, y, x, q);
      nxt[p] = update(u[p], omega, message(wk, q),
                      mask == nullptr || mask[p]);
    }
    __syncthreads();  // all reads of `cur` done before it is overwritten
    float* tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  for (int p = threadIdx.x; p < HW; p += blockDim.x) out[p] = cur[p];
}

// ------------------------------------------------------------- global path
__global__ void __launch_bounds__(kGlobalThreads)
    mf_global_step_kernel(const float* __restrict__ ws,
                          const bool* __restrict__ mask,
                          const float* __restrict__ cur,
                          float* __restrict__ nxt, int64_t B, int H, int W,
                          float omega) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t total = B * HW;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       g < total; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = g / HW;
    const int p = static_cast<int>(g - b * HW);
    const int y = p / W, x = p - (p / W) * W;
    const float* wb = ws + b * kWsPlanes * HW;
    float wk[kNumNbr], q[kNumNbr];
    gather_w(wb, HW, H, W, y, x, wk);
    gather_q(cur + b * HW, H, W, y, x, q);
    nxt[g] = update(wb[kNumPlanes * HW + p], omega, message(wk, q),
                    mask == nullptr || mask[g]);
  }
}

// ------------------------------------------------------------------ host
enum class Path { kAuto, kReg, kSmem, kGlobal };

Path forced_path() {
  const char* e = std::getenv("MAL_CRF_CUDA_PATH");
  if (e == nullptr) return Path::kAuto;
  if (std::strcmp(e, "reg") == 0) return Path::kReg;
  if (std::strcmp(e, "smem") == 0) return Path::kSmem;
  if (std::strcmp(e, "global") == 0) return Path::kGlobal;
  return Path::kAuto;
}

int grid_for(int64_t total, int threads, int dev) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = (total + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

template <int PPT>
void launch_reg(const Prepared& P, const bool* mask, float* out, int iters,
                float omega, cudaStream_t stream) {
  const int HW = static_cast<int>(P.H * P.W);
  int threads = (HW + PPT - 1) / PPT;
  threads = ((threads + 31) / 32) * 32;
  const size_t smem = 2 * static_cast<size_t>(HW) * sizeof(float);
  MF_LAUNCH(mf_reg_kernel<PPT>, static_cast<unsigned>(P.B), threads, smem, stream)(
      P.image.const_data_ptr<float>(), P.prob.const_data_ptr<float>(), mask,
      out, static_cast<int>(P.C), static_cast<int>(P.H),
      static_cast<int>(P.W), iters, P.inv_two_zeta2, omega);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mean_field_cuda(const at::Tensor& image, const at::Tensor& prob,
                           const std::optional<at::Tensor>& box_mask,
                           int64_t iters, double zeta, double omega) {
  TORCH_CHECK(image.device().type() == kDeviceType,
              "mal::mean_field: expected image on ", kDeviceType, ", got ",
              image.device());
  mf_gpu::CUDAGuard guard(image.device());
  Prepared P = prepare_inputs(image, prob, box_mask, iters, zeta, omega,
                              kDeviceType);
  TORCH_CHECK(iters <= std::numeric_limits<int>::max(),
              "mal::mean_field: iters too large: ", num(iters));
  TORCH_CHECK(P.B <= std::numeric_limits<int>::max(),
              "mal::mean_field: batch too large for CUDA grid: ", num(P.B));
  at::Tensor out = at::empty({P.B, P.H, P.W}, P.prob.options());
  const int64_t HW = P.H * P.W;
  if (P.B == 0 || HW == 0) return out;

  cudaStream_t stream = mf_gpu::getCurrentCUDAStream(image.get_device());
  const bool* mask = P.mask.defined() ? P.mask.const_data_ptr<bool>() : nullptr;
  float* o = out.mutable_data_ptr<float>();
  const int it = static_cast<int>(iters);
  const float om = static_cast<float>(omega);
  const int dev = image.get_device();

  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t smem_q = 2 * static_cast<size_t>(HW) * sizeof(float);

  Path path = forced_path();
  if (path == Path::kReg && HW > kRegMaxPixels) path = Path::kAuto;
  if (path == Path::kSmem && smem_q > static_cast<size_t>(smem_optin))
    path = Path::kAuto;
  if (path == Path::kAuto) {
    if (HW <= kRegMaxPixels)
      path = Path::kReg;
    else if (smem_q <= static_cast<size_t>(smem_optin))
      path = Path::kSmem;
    else
      path = Path::kGlobal;
  }

  if (path == Path::kReg) {
    if (HW <= kRegThreads * 1)
      launch_reg<1>(P, mask, o, it, om, stream);
    else if (HW <= kRegThreads * 2)
      launch_reg<2>(P, mask, o, it, om, stream);
    else if (HW <= kRegThreads * 4)
      launch_reg<4>(P, mask, o, it, om, stream);
    else
      launch_reg<kRegMaxPPT>(P, mask, o, it, om, stream);
    return out;
  }

  // smem + global: unary and weight planes once into a workspace.
  at::Tensor ws = at::empty({P.B, kWsPlanes, HW}, P.prob.options());
  at::Tensor tmp;
  float* cur = nullptr;
  float* nxt = nullptr;
  if (path == Path::kGlobal) {
    tmp = at::empty_like(out);
    // ping-pong so that after `iters` swaps the iterate is in `out`
    cur = (iters % 2 == 0) ? o : tmp.mutable_data_ptr<float>();
    nxt = (iters % 2 == 0) ? tmp.mutable_data_ptr<float>() : o;
  }
  const int64_t total = P.B * HW;
  MF_LAUNCH(mf_prepare_kernel, grid_for(total, kGlobalThreads, dev),
            kGlobalThreads, 0, stream)(
      P.image.const_data_ptr<float>(), P.prob.const_data_ptr<float>(), mask,
      ws.mutable_data_ptr<float>(), cur, P.B, static_cast<int>(P.C),
      static_cast<int>(P.H), static_cast<int>(P.W), P.inv_two_zeta2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (path == Path::kSmem) {
    if (smem_q > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          mf_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
          static_cast<int>(smem_q)));
    }
    const int threads = static_cast<int>(
        std::min<int64_t>(kSmemThreads, ((HW + 31) / 32) * 32));
    MF_LAUNCH(mf_smem_kernel, static_cast<unsigned>(P.B), threads, smem_q,
              stream)(
        ws.const_data_ptr<float>(), P.prob.const_data_ptr<float>(), mask, o,
        static_cast<int>(P.H), static_cast<int>(P.W), it, om);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  const int grid = grid_for(total, kGlobalThreads, dev);
  for (int t = 0; t < it; ++t) {
    MF_LAUNCH(mf_global_step_kernel, grid, kGlobalThreads, 0, stream)(
        ws.const_data_ptr<float>(), mask, cur, nxt, P.B,
        static_cast<int>(P.H), static_cast<int>(P.W), om);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::swap(cur, nxt);
  }
  return out;
}

}  // namespace
}  // namespace mal_crf

#if !defined(MAL_CRF_CUDA_EMU)  // the emulated build registers its own op
TORCH_LIBRARY_IMPL(mal, CUDA, m) {
  m.impl("mean_field", &mal_crf::mean_field_cuda);
}
#endif
