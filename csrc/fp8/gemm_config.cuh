// CUTLASS 3.x kernel types of the FP8 block-scaled GEMMs (sm_90a): TMA loads, warp-specialized cooperative WGMMA
// (two consumer warpgroups, 64 rows of the 128-row tile each), fp32 promotion of every 128-wide K block with its
// a_scale * b_scale, TMA store of bf16. Included only by the files that instantiate a kernel (fp8_gemm.cu,
// fp8_grouped_gemm.cu, fp8_grouped_gemm_masked.cu): each instantiation costs a minute or more of nvcc time, so each
// file holds exactly one.
//
// Tile choice (see the notes at each config): 128 x 128 x 128 by default (dense and grouped contiguous), 64 x 128 x
// 128 ping-pong for the masked (decode) layout. BLOCK_M 128 is what the cooperative schedule needs
// (2 x 64 rows), BLOCK_N 128 matches the 128-row weight-scale block (one b_scale per tile and K block, a scalar
// multiply in the promotion), BLOCK_K 128 matches the scale granularity (one promotion per pipeline stage). A wider
// N tile would need 2 x 128 fp32 accumulator registers per thread (the running sum plus the WGMMA partial) and spill.
#pragma once

#include "gemm_common.cuh"

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace dsv2 {
namespace fp8 {

using LayoutTagA = cutlass::layout::RowMajor;     // [M, K]
using LayoutTagB = cutlass::layout::ColumnMajor;  // K x N with K contiguous, i.e. our [N, K]
using LayoutTagD = cutlass::layout::RowMajor;     // [M, N]
constexpr int kAlignAB = 16;                      // elements: 16 bytes of e4m3, the TMA minimum
constexpr int kAlignD = 8;                        // 16 bytes of bf16

// 128 x 128 output tiles, the two consumer warpgroups cooperating on one tile (64 rows each): the default.
// Every config runs in clusters of two CTAs along N: the pair shares its A tile, which the TMA unit multicasts to both,
// halving A's L2-to-SM traffic (the cluster shape of CUTLASS's blockwise FP8 examples; +7.5 % on the dense GEMM at
// 4096 x 7168 x 16384 on the H200). An odd number of N tiles leaves one CTA of the last pair without work.
struct Tile128 {
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using GroupedSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
  using GroupedEpilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// 64 x 128 output tiles, each consumer warpgroup on its own tile (ping-pong: one's MMAs overlap the other's
// promotion and epilogue). For decode-sized groups (<= 64 rows): a 128-row tile would run twice the tensor-core work
// on rows that do not exist, which at 1-64 rows per expert is as long as streaming the weight tile itself.
struct Tile64 {
  using Tile = cute::Shape<cute::_64, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using GroupedSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise;
  using GroupedEpilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

using LinComb = cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc, void, ElementAcc>;

// Dense: one problem, persistent stream-K scheduler. Stream-K matters at small M, where there are fewer output
// tiles than SMs (M = 128, N = 7168: 56 tiles on 132 SMs): the K loop of the tiles is split over the idle SMs and the
// fp32 partials reduced through the workspace (deterministic order). With many tiles CUTLASS's heuristic runs
// data-parallel waves, and stream-K only for a last wave that would run less than half full.
template <class Cfg>
struct DenseGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, void, LayoutTagD, kAlignD, ElementD,
      LayoutTagD, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative, LinComb>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutTagA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutTagB, LayoutSFB>, kAlignAB, ElementAcc, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// CUTLASS's grouped blockwise mainloop rebuilds each group's scale layouts from the problem shape, assuming packed
// scales (A's K-block stride = that group's M). Ours are views into one [rows, K/128] column-major tensor (stride
// M_pad of the whole tensor, and the masked layout's groups hold fewer rows than they are spaced apart), so this
// wrapper takes each group's layouts from the per-group arrays the caller filled (GroupArrays::layout_sfa/sfb), as
// the Arguments already carry them. Everything else is CUTLASS's.
template <class Base>
struct GroupLayoutMainloop : Base {
  using Params = typename Base::Params;
  using InternalLayoutSFA = typename Base::InternalLayoutSFA;
  using InternalLayoutSFB = typename Base::InternalLayoutSFB;
  using ElementBlockScale = typename Base::ElementBlockScale;

  // Before the first group is known: the A/B TMA views, and placeholder scale views of the right types.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& shape, Params const& params) const {
    auto in = Base::load_init(shape, params);
    return cute::make_tuple(cute::get<0>(in), cute::get<1>(in),
                            cute::make_tensor(cute::make_gmem_ptr(static_cast<ElementBlockScale const*>(nullptr)),
                                              InternalLayoutSFA{}),
                            cute::make_tensor(cute::make_gmem_ptr(static_cast<ElementBlockScale const*>(nullptr)),
                                              InternalLayoutSFB{}));
  }

  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE auto tensors_perform_update(InputTensors const&, Params const& params, ProblemShape_MNKL shape,
                                             int32_t group) {
    auto in = Base::load_init(shape, params);
    return cute::make_tuple(cute::get<0>(in), cute::get<1>(in),
                            cute::make_tensor(cute::make_gmem_ptr(params.ptr_SFA[group]), params.layout_SFA[group]),
                            cute::make_tensor(cute::make_gmem_ptr(params.ptr_SFB[group]), params.layout_SFB[group]));
  }
};

// Grouped (ptr-array): per-group problem shapes and pointers in device memory, filled on the GPU (no host sync),
// persistent grid of one CTA per SM walking the groups' tiles; groups of 0 rows have no tiles.
template <class Cfg>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<GroupShape>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, void, LayoutTagD*, kAlignD, ElementD,
      LayoutTagD*, kAlignD, typename Cfg::GroupedEpilogue, LinComb>::CollectiveOp;
  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutTagA*, LayoutSFA*>, kAlignAB,
      ElementB, cute::tuple<LayoutTagB*, LayoutSFB*>, kAlignAB, ElementAcc, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Cfg::GroupedSchedule>::CollectiveOp;
  using Mainloop = GroupLayoutMainloop<BuiltMainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static_assert(std::is_same_v<typename Kernel::InternalStrideA, GroupStride>);
  static_assert(std::is_same_v<typename Kernel::InternalStrideB, GroupStride>);
  static_assert(std::is_same_v<typename Kernel::InternalStrideD, GroupStride>);
  static_assert(std::is_same_v<typename BuiltMainloop::InternalLayoutSFA, LayoutSFA>);
  static_assert(std::is_same_v<typename BuiltMainloop::InternalLayoutSFB, LayoutSFB>);
};

// Launch helper shared by the kernel files. `probe` is what CUTLASS's can_implement checks (the arguments
// themselves, except where a check is stricter than the hardware; see run_dense).
template <class Gemm>
void run_cutlass(typename Gemm::Arguments const& args, typename Gemm::Arguments const& probe, const at::Tensor& like,
                 cudaStream_t stream, const char* op) {
  Gemm gemm;
  const cutlass::Status ok = gemm.can_implement(probe);
  TORCH_CHECK(ok == cutlass::Status::kSuccess, "dsv2_kernels.", op, ": CUTLASS cannot run this problem: ",
              cutlassGetStatusString(ok));
  const size_t ws_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                                   like.options().dtype(at::kByte));
  cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "dsv2_kernels.", op, ": CUTLASS initialize failed: ",
              cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "dsv2_kernels.", op, ": CUTLASS launch failed: ",
              cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The grouped kernel of config Cfg over groups whose arrays a kernel queued earlier on `stream` fills.
template <class Cfg>
void run_grouped(const GroupArrays& g, int num_groups, const at::Tensor& like, cudaStream_t stream, const char* op) {
  using Grouped = GroupedGemm<Cfg>;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = like.get_device();
  hw.sm_count = sm_count(hw.device_id);
  // Host problem shapes are not passed: the shapes exist only on the GPU, and the persistent grid (one CTA per SM)
  // walks the tiles of every group in order, skipping groups of 0 rows.
  typename Grouped::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {num_groups, g.shape, nullptr},
      {g.a, g.stride_a, g.b, g.stride_b, g.sfa, g.layout_sfa, g.sfb, g.layout_sfb},
      {{}, nullptr, g.stride_d, g.d, g.stride_d},
      hw};
  run_cutlass<typename Grouped::Gemm>(args, args, like, stream, op);
}

}  // namespace fp8
}  // namespace dsv2
