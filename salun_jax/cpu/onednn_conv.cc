// oneDNN convolutions for XLA:CPU, called through the XLA FFI (see onednn.py, which builds and
// registers this file).
//
// Three handlers, all float32, NHWC activations and HWIO kernels (JAX's layouts):
//   salun_onednn_conv_forward(x [B,H,W,C], w [kh,kw,C,O]) -> y [B,Ho,Wo,O]
//   salun_onednn_conv_input_grad(g [B,Ho,Wo,O], w) -> dx [B,H,W,C]
//   salun_onednn_conv_weight_grad(x, g) -> dw [kh,kw,C,O]
// with attributes stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right.
//
// oneDNN picks its own blocked kernel layout ("any"); the HWIO kernel is reordered into it and
// the weight gradient out of it, each call (kernels are small next to activations). Primitives
// and reorders are built once per shape and kept; each call passes its own scratchpad, so the
// same primitive may run on several XLA threads at once.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

struct Geometry {
  int64_t b, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr;
  auto key() const { return std::make_tuple(b, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr); }
};

// Everything built for one geometry.
struct Kernels {
  memory::desc x_md, y_md, w_user_md;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  dnnl::reorder::primitive_desc w_to_fwd_pd, w_to_bwd_data_pd, dw_to_user_pd;
  dnnl::reorder w_to_fwd, w_to_bwd_data, dw_to_user;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::unique_ptr<Kernels> Build(const Geometry& g) {
  auto& engine = Engine();
  auto f32 = memory::data_type::f32;
  memory::dims x_dims{g.b, g.c, g.h, g.w}, y_dims{g.b, g.o, g.ho, g.wo};
  memory::dims w_dims{g.o, g.c, g.kh, g.kw}, strides{g.sh, g.sw};
  memory::dims pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  memory::desc x_md(x_dims, f32, Tag::nhwc), y_md(y_dims, f32, Tag::nhwc);
  memory::desc w_user_md(w_dims, f32, Tag::hwio), w_any(w_dims, f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algorithm = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd_pd(
      engine, dnnl::prop_kind::forward_training, algorithm, x_md, w_any, y_md, strides, pad_l,
      pad_r, attr);
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd(
      engine, algorithm, x_md, w_any, y_md, strides, pad_l, pad_r, fwd_pd, attr);
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd(
      engine, algorithm, x_md, w_any, y_md, strides, pad_l, pad_r, fwd_pd, attr);
  dnnl::reorder::primitive_desc w_to_fwd_pd(engine, w_user_md, engine, fwd_pd.weights_desc(),
                                            attr);
  dnnl::reorder::primitive_desc w_to_bwd_data_pd(engine, w_user_md, engine,
                                                 bwd_data_pd.weights_desc(), attr);
  dnnl::reorder::primitive_desc dw_to_user_pd(engine, bwd_weights_pd.diff_weights_desc(), engine,
                                              w_user_md, attr);
  return std::unique_ptr<Kernels>(new Kernels{
      x_md, y_md, w_user_md, fwd_pd, bwd_data_pd, bwd_weights_pd,
      dnnl::convolution_forward(fwd_pd), dnnl::convolution_backward_data(bwd_data_pd),
      dnnl::convolution_backward_weights(bwd_weights_pd), w_to_fwd_pd, w_to_bwd_data_pd,
      dw_to_user_pd, dnnl::reorder(w_to_fwd_pd), dnnl::reorder(w_to_bwd_data_pd),
      dnnl::reorder(dw_to_user_pd)});
}

Kernels& Lookup(const Geometry& g) {
  static std::mutex mutex;
  static std::map<decltype(g.key()), std::unique_ptr<Kernels>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[g.key()];
  if (!slot) slot = Build(g);
  return *slot;
}

// Per-thread buffers that only grow: 0 scratchpads, 1 blocked kernels, 2 blocked kernel gradients.
char* ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<char> buffers[3];
  auto& buffer = buffers[which];
  if (buffer.size() < bytes + 64) buffer.resize(bytes + 64);
  auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64);
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

memory Scratch(const memory::desc& md) { return memory(md, Engine(), ThreadBuffer(0, md.get_size())); }

void Reorder(dnnl::reorder& reorder, const dnnl::reorder::primitive_desc& pd, const memory& from,
             const memory& to) {
  reorder.execute(Stream(), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                             {DNNL_ARG_SCRATCHPAD, Scratch(pd.scratchpad_desc())}});
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

template <typename F>
ffi::Error Guard(F&& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// The HWIO kernel at `data`, reordered into the blocked layout `pd` targets (a per-thread buffer).
memory BlockedKernel(const Kernels& k, dnnl::reorder& reorder,
                     const dnnl::reorder::primitive_desc& pd, float* data) {
  memory blocked(pd.dst_desc(), Engine(), ThreadBuffer(1, pd.dst_desc().get_size()));
  Reorder(reorder, pd, memory(k.w_user_md, Engine(), data), blocked);
  return blocked;
}

// Runs `primitive` on `args` plus a scratchpad, and waits for it.
void Execute(const dnnl::primitive& primitive, const memory::desc& scratch_md,
             std::unordered_map<int, memory> args) {
  args.insert({DNNL_ARG_SCRATCHPAD, Scratch(scratch_md)});
  primitive.execute(Stream(), args);
  Stream().wait();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Guard([&] {
    auto& k = Lookup(
        MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr));
    Execute(k.fwd, k.fwd_pd.scratchpad_desc(),
            {{DNNL_ARG_SRC, memory(k.x_md, Engine(), x.typed_data())},
             {DNNL_ARG_WEIGHTS, BlockedKernel(k, k.w_to_fwd, k.w_to_fwd_pd, w.typed_data())},
             {DNNL_ARG_DST, memory(k.y_md, Engine(), y->typed_data())}});
  });
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr) {
  return Guard([&] {
    auto& k = Lookup(
        MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr));
    Execute(k.bwd_data, k.bwd_data_pd.scratchpad_desc(),
            {{DNNL_ARG_DIFF_DST, memory(k.y_md, Engine(), dy.typed_data())},
             {DNNL_ARG_WEIGHTS,
              BlockedKernel(k, k.w_to_bwd_data, k.w_to_bwd_data_pd, w.typed_data())},
             {DNNL_ARG_DIFF_SRC, memory(k.x_md, Engine(), dx->typed_data())}});
  });
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  return Guard([&] {
    auto& k = Lookup(
        MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr));
    auto blocked_md = k.bwd_weights_pd.diff_weights_desc();
    memory dw_blocked(blocked_md, Engine(), ThreadBuffer(2, blocked_md.get_size()));
    Execute(k.bwd_weights, k.bwd_weights_pd.scratchpad_desc(),
            {{DNNL_ARG_SRC, memory(k.x_md, Engine(), x.typed_data())},
             {DNNL_ARG_DIFF_DST, memory(k.y_md, Engine(), dy.typed_data())},
             {DNNL_ARG_DIFF_WEIGHTS, dw_blocked}});
    Reorder(k.dw_to_user, k.dw_to_user_pd, dw_blocked,
            memory(k.w_user_md, Engine(), dw->typed_data()));
    Stream().wait();
  });
}

}  // namespace

#define SALUN_CONV_BINDING                       \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Attr<int64_t>("stride_h")                 \
      .Attr<int64_t>("stride_w")                 \
      .Attr<int64_t>("pad_top")                  \
      .Attr<int64_t>("pad_bottom")               \
      .Attr<int64_t>("pad_left")                 \
      .Attr<int64_t>("pad_right")

// The handlers are this library's only exported symbols (it is built with -fvisibility=hidden).
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(salun_onednn_conv_forward, Forward, SALUN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(salun_onednn_conv_input_grad, InputGrad, SALUN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(salun_onednn_conv_weight_grad, WeightGrad, SALUN_CONV_BINDING);
#pragma GCC visibility pop
