// The CUDA kernels and launcher of mal::mean_field (mean_field_cuda.cu) built
// as host C++ on the emulator in cuda_emu.h, for tests (crf_ext flavour
// cuda_emu; never loaded in normal use).  On CPU tensors:
//
//   torch.ops.mal_cuda_emu.mean_field(image, prob, box_mask, iters, zeta, omega)
//   torch.ops.mal_cuda_emu.launches(): the kernel launches of the last call,
//       "name grid=G block=T smem=S" each
//
// The flavour cuda_emu_nobarrier builds it with __syncthreads() doing nothing
// (ops in mal_cuda_emu_nobarrier), to show the tests catch a missing barrier.
#define MAL_CRF_CUDA_EMU
#include "mean_field_cuda.cu"

#if defined(MAL_CRF_EMU_NO_BARRIER)
#define MF_EMU_NS mal_cuda_emu_nobarrier
#else
#define MF_EMU_NS mal_cuda_emu
#endif
// TORCH_LIBRARY pastes its namespace argument: expand MF_EMU_NS first.
#define MF_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace {

at::Tensor mean_field_emulated(const at::Tensor& image, const at::Tensor& prob,
                               const std::optional<at::Tensor>& box_mask,
                               int64_t iters, double zeta, double omega) {
  cuda_emu::launch_log.clear();
  return mal_crf::mean_field_cuda(image, prob, box_mask, iters, zeta, omega);
}

std::vector<std::string> launches() { return cuda_emu::launch_log; }

}  // namespace

MF_LIBRARY(MF_EMU_NS, m) {
  m.def("mean_field(Tensor image, Tensor prob, Tensor? box_mask, int iters, "
        "float zeta=0.5, float omega=2.0) -> Tensor");
  m.def("launches() -> str[]");
  m.impl("mean_field", c10::DispatchKey::CPU, &mean_field_emulated);
  m.impl("launches", &launches);
}
