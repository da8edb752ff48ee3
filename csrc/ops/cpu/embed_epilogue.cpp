// CPU implementation of condense::embed_epilogue / embed_epilogue_backward (schema in
// csrc/ops/embed_epilogue.cpp). x is viewed as n·G rows, one per (sample, group), each the
// group's C/G contiguous channel planes. A thread owns whole rows, so every reduction stays in
// it and the result does not depend on the thread count.
//
// Forward, per row: one pass for the mean and variance (sums of x − x₀, x₀ the row's first
// element, so a large mean does not cancel the variance away), one pass that writes only the
// activated, pooled output: the full-resolution normalised activation never reaches memory.
// Backward, per row: dz = act′(z)·g/4 spread from each pooled gradient g to its taps (0 for a
// dropped row or column); pass 1 keeps dz in a per-thread buffer and sums dz and dz·x̂ per
// channel (the bias and weight gradients, per sample, summed over samples in a fixed order at
// the end); pass 2 writes dx = rstd·(w·dz − mean(w·dz) − x̂·mean(w·dz·x̂)).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace condense {
namespace {

enum class Activation { kRelu, kLeakyRelu, kSigmoid, kSwish };

Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "leakyrelu") return Activation::kLeakyRelu;
  if (name == "sigmoid") return Activation::kSigmoid;
  TORCH_CHECK(name == "swish", "embed_epilogue: act must be relu, leakyrelu, sigmoid or swish, got ",
              name);
  return Activation::kSwish;
}

// Calls body(std::integral_constant<Activation, act>), so the activation is a compile-time
// constant in the inner loops.
template <typename Body>
void with_activation(Activation act, const Body& body) {
  switch (act) {
    case Activation::kRelu:
      return body(std::integral_constant<Activation, Activation::kRelu>());
    case Activation::kLeakyRelu:
      return body(std::integral_constant<Activation, Activation::kLeakyRelu>());
    case Activation::kSigmoid:
      return body(std::integral_constant<Activation, Activation::kSigmoid>());
    case Activation::kSwish:
      return body(std::integral_constant<Activation, Activation::kSwish>());
  }
}

// A NaN stays NaN through every activation, as in torch, so a spoilt input reaches the loss.
template <Activation kAct, typename T>
inline T activate(T z, T slope) {
  if constexpr (kAct == Activation::kRelu) {
    return z < T(0) ? T(0) : z;
  } else if constexpr (kAct == Activation::kLeakyRelu) {
    return z > T(0) ? z : z * slope;
  } else if constexpr (kAct == Activation::kSigmoid) {
    return T(1) / (T(1) + std::exp(-z));
  } else {
    return z / (T(1) + std::exp(-z));
  }
}

// d act / dz, with the subgradient at 0 that torch uses (0 for relu, slope for leaky relu).
template <Activation kAct, typename T>
inline T activation_derivative(T z, T slope) {
  if constexpr (kAct == Activation::kRelu) {
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (kAct == Activation::kLeakyRelu) {
    return z > T(0) ? T(1) : slope;
  } else {
    const T s = T(1) / (T(1) + std::exp(-z));
    if constexpr (kAct == Activation::kSigmoid) {
      return s * (T(1) - s);
    } else {
      return s * (T(1) + z * (T(1) - s));
    }
  }
}

struct Geometry {
  int64_t samples, channels, groups, height, width;
  bool pool;
  int64_t channels_per_group() const { return channels / groups; }
  int64_t plane() const { return height * width; }
  int64_t out_height() const { return pool ? height / 2 : height; }
  int64_t out_width() const { return pool ? width / 2 : width; }
  int64_t out_plane() const { return out_height() * out_width(); }
  int64_t rows() const { return samples * groups; }
  int64_t row_size() const { return channels_per_group() * plane(); }
  // Rows per parallel task: enough elements that a task outweighs its scheduling.
  int64_t grain() const { return std::max<int64_t>(1, 16384 / row_size()); }
};

Geometry check_geometry(const char* name, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& bias, int64_t groups, bool pool) {
  TORCH_CHECK(x.dim() == 4, name, ": x must be (n, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, name, ": x must not be empty, got shape ", x.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, name, ": groups must divide C=", channels,
              ", got ", groups);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == channels, name, ": weight must be (", channels,
              ",), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, name, ": bias must be (", channels,
              ",), got ", bias.sizes());
  TORCH_CHECK(!pool || (x.size(2) >= 2 && x.size(3) >= 2), name,
              ": pooling needs H, W >= 2, got shape ", x.sizes());
  return Geometry{x.size(0), channels, groups, x.size(2), x.size(3), pool};
}

// (mean, 1/sqrt(var + eps)) of a row's `count` elements. Shifted sums, in lanes the compiler
// can vectorise, flushed to double every block so a long row (one group over many channels)
// keeps its precision.
template <typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> row_statistics(const scalar_t* row, int64_t count, double eps) {
  constexpr int64_t kLanes = 8, kBlock = 1024;
  const acc_t shift = static_cast<acc_t>(row[0]);
  double total = 0, total_squares = 0;
  for (int64_t start = 0; start < count; start += kBlock) {
    const int64_t stop = std::min(count, start + kBlock);
    acc_t sum[kLanes] = {}, squares[kLanes] = {};
    int64_t k = start;
    for (; k + kLanes <= stop; k += kLanes) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const acc_t d = static_cast<acc_t>(row[k + lane]) - shift;
        sum[lane] += d;
        squares[lane] += d * d;
      }
    }
    for (; k < stop; ++k) {
      const acc_t d = static_cast<acc_t>(row[k]) - shift;
      sum[0] += d;
      squares[0] += d * d;
    }
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      total += static_cast<double>(sum[lane]);
      total_squares += static_cast<double>(squares[lane]);
    }
  }
  const double shifted_mean = total / static_cast<double>(count);
  const double variance =
      std::max(total_squares / static_cast<double>(count) - shifted_mean * shifted_mean, 0.0);
  return {static_cast<acc_t>(static_cast<double>(shift) + shifted_mean),
          static_cast<acc_t>(1.0 / std::sqrt(variance + eps))};
}

// One row's activated (and pooled) output: out[c] = pool(act((x[c] − mean)·rstd·w + b)). With
// pooling, each plane is activated into `scratch` (plane elements, in cache) by a flat loop the
// compiler vectorises, then averaged 2×2 from there.
template <Activation kAct, typename scalar_t, typename acc_t>
void forward_row(const scalar_t* x, scalar_t* out, const acc_t* weight, const acc_t* bias,
                 acc_t mean, acc_t rstd, acc_t slope, acc_t* scratch, const Geometry& g) {
  const int64_t plane = g.plane(), out_width = g.out_width();
  for (int64_t c = 0; c < g.channels_per_group(); ++c) {
    const acc_t scale = rstd * weight[c], shift = bias[c];
    const scalar_t* xc = x + c * plane;
    scalar_t* dst = out + c * g.out_plane();
    if (!g.pool) {
      for (int64_t p = 0; p < plane; ++p)
        dst[p] = static_cast<scalar_t>(activate<kAct>((static_cast<acc_t>(xc[p]) - mean) * scale + shift, slope));
      continue;
    }
    for (int64_t p = 0; p < plane; ++p)
      scratch[p] = activate<kAct>((static_cast<acc_t>(xc[p]) - mean) * scale + shift, slope);
    for (int64_t i = 0; i < g.out_height(); ++i) {
      const acc_t* top = scratch + 2 * i * g.width;
      const acc_t* bottom = top + g.width;
      for (int64_t j = 0; j < out_width; ++j) {
        const acc_t taps = top[2 * j] + top[2 * j + 1] + bottom[2 * j] + bottom[2 * j + 1];
        dst[i * out_width + j] = static_cast<scalar_t>(acc_t(0.25) * taps);
      }
    }
  }
}

// The upstream gradient of each element of one input plane, into `upstream` (plane elements):
// grad_out itself, or with pooling a quarter of its pooled gradient (0 for a dropped row or
// column).
template <typename scalar_t, typename acc_t>
void spread_upstream(const scalar_t* grad_out, acc_t* upstream, const Geometry& g) {
  if (!g.pool) {
    for (int64_t p = 0; p < g.plane(); ++p) upstream[p] = static_cast<acc_t>(grad_out[p]);
    return;
  }
  const int64_t out_width = g.out_width();
  for (int64_t i = 0; i < g.height; ++i) {
    acc_t* dst = upstream + i * g.width;
    if (i >= 2 * g.out_height()) {
      std::fill(dst, dst + g.width, acc_t(0));
      continue;
    }
    const scalar_t* src = grad_out + (i / 2) * out_width;
    for (int64_t j = 0; j < out_width; ++j) {
      const acc_t quarter = acc_t(0.25) * static_cast<acc_t>(src[j]);
      dst[2 * j] = quarter;
      dst[2 * j + 1] = quarter;
    }
    std::fill(dst + 2 * out_width, dst + g.width, acc_t(0));
  }
}

// One row's input gradient; also writes its channels' Σ dz and Σ dz·x̂ (for this sample).
// `dz` is scratch of row_size elements: it holds each element's upstream gradient, then its dz.
template <Activation kAct, typename scalar_t, typename acc_t>
void backward_row(const scalar_t* grad_out, const scalar_t* x, scalar_t* grad_x,
                  const acc_t* weight, const acc_t* bias, acc_t mean, acc_t rstd, acc_t slope,
                  acc_t* channel_dz, acc_t* channel_dz_xhat, acc_t* dz, const Geometry& g) {
  constexpr int64_t kLanes = 8;
  const int64_t plane = g.plane();
  double group_dxhat = 0, group_dxhat_xhat = 0;
  for (int64_t c = 0; c < g.channels_per_group(); ++c) {
    const acc_t w = weight[c], b = bias[c];
    const scalar_t* xc = x + c * plane;
    acc_t* dzc = dz + c * plane;
    spread_upstream(grad_out + c * g.out_plane(), dzc, g);
    acc_t sum_dz[kLanes] = {}, sum_dz_xhat[kLanes] = {};
    const auto accumulate = [&](int64_t p, int64_t lane) {
      const acc_t xhat = (static_cast<acc_t>(xc[p]) - mean) * rstd;
      const acc_t d = activation_derivative<kAct>(xhat * w + b, slope) * dzc[p];
      dzc[p] = d;
      sum_dz[lane] += d;
      sum_dz_xhat[lane] += d * xhat;
    };
    int64_t p = 0;
    for (; p + kLanes <= plane; p += kLanes)
      for (int64_t lane = 0; lane < kLanes; ++lane) accumulate(p + lane, lane);
    for (; p < plane; ++p) accumulate(p, 0);
    acc_t channel_sum = 0, channel_sum_xhat = 0;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      channel_sum += sum_dz[lane];
      channel_sum_xhat += sum_dz_xhat[lane];
    }
    channel_dz[c] = channel_sum;
    channel_dz_xhat[c] = channel_sum_xhat;
    group_dxhat += static_cast<double>(w) * channel_sum;
    group_dxhat_xhat += static_cast<double>(w) * channel_sum_xhat;
  }
  const double count = static_cast<double>(g.row_size());
  const acc_t mean_dxhat = static_cast<acc_t>(group_dxhat / count);
  const acc_t mean_dxhat_xhat = static_cast<acc_t>(group_dxhat_xhat / count);
  for (int64_t c = 0; c < g.channels_per_group(); ++c) {
    const acc_t w = weight[c];
    const scalar_t* xc = x + c * plane;
    const acc_t* dzc = dz + c * plane;
    scalar_t* gxc = grad_x + c * plane;
    for (int64_t p = 0; p < plane; ++p) {
      const acc_t xhat = (static_cast<acc_t>(xc[p]) - mean) * rstd;
      gxc[p] = static_cast<scalar_t>(rstd * (w * dzc[p] - mean_dxhat - xhat * mean_dxhat_xhat));
    }
  }
}

// Σ over samples of per-(sample, channel) sums (n, C) -> (C,): each channel added in sample
// order in double, so the weight and bias gradients do not depend on the thread count either.
at::Tensor sum_over_samples(const at::Tensor& per_sample) {
  at::Tensor total = at::empty({per_sample.size(1)}, per_sample.options());
  AT_DISPATCH_FLOATING_TYPES(per_sample.scalar_type(), "sum_over_samples", [&] {
    const scalar_t* src = per_sample.data_ptr<scalar_t>();
    scalar_t* dst = total.data_ptr<scalar_t>();
    const int64_t samples = per_sample.size(0), channels = per_sample.size(1);
    at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0;
        for (int64_t b = 0; b < samples; ++b) sum += static_cast<double>(src[b * channels + c]);
        dst[c] = static_cast<scalar_t>(sum);
      }
    });
  });
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_epilogue_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
    double eps, c10::string_view act, double slope, bool pool) {
  const Geometry g = check_geometry("embed_epilogue", x, weight, bias, groups, pool);
  const Activation activation = parse_activation(act);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor input = x.contiguous();
  const at::Tensor w = weight.to(acc_type).contiguous(), b = bias.to(acc_type).contiguous();
  at::Tensor out = at::empty({g.samples, g.channels, g.out_height(), g.out_width()}, x.options());
  at::Tensor mean = at::empty({g.rows()}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "embed_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = input.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const acc_t *wp = w.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>();
    acc_t *meanp = mean.data_ptr<acc_t>(), *rstdp = rstd.data_ptr<acc_t>();
    with_activation(activation, [&](auto tag) {
      constexpr Activation kAct = decltype(tag)::value;
      at::parallel_for(0, g.rows(), g.grain(), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(g.plane());
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = xp + r * g.row_size();
          const auto [row_mean, row_rstd] = row_statistics<scalar_t, acc_t>(row, g.row_size(), eps);
          meanp[r] = row_mean;
          rstdp[r] = row_rstd;
          const int64_t first_channel = (r % groups) * g.channels_per_group();
          forward_row<kAct>(row, outp + r * g.channels_per_group() * g.out_plane(),
                            wp + first_channel, bp + first_channel, row_mean, row_rstd,
                            static_cast<acc_t>(slope), scratch.data(), g);
        }
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_epilogue_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    c10::string_view act, double slope, bool pool) {
  const Geometry g = check_geometry("embed_epilogue_backward", x, weight, bias, groups, pool);
  const Activation activation = parse_activation(act);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.samples, g.channels, g.out_height(), g.out_width()}),
              "embed_epilogue_backward: grad_out must have the output's shape, got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
              "embed_epilogue_backward: grad_out must have x's dtype ", x.scalar_type(), ", got ",
              grad_out.scalar_type());
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->dim() == 1 && stat->size(0) == g.rows() && stat->scalar_type() == acc_type,
                "embed_epilogue_backward: mean and rstd must be (", g.rows(), ",) ", acc_type,
                " as the forward returns them, got ", stat->sizes(), " ", stat->scalar_type());
  }
  const at::Tensor input = x.contiguous(), upstream = grad_out.contiguous();
  const at::Tensor row_mean = mean.contiguous(), row_rstd = rstd.contiguous();
  const at::Tensor w = weight.to(acc_type).contiguous(), b = bias.to(acc_type).contiguous();
  at::Tensor grad_x = at::empty_like(input);
  at::Tensor channel_dz = at::empty({g.samples, g.channels}, x.options().dtype(acc_type));
  at::Tensor channel_dz_xhat = at::empty_like(channel_dz);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "embed_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = input.data_ptr<scalar_t>(), *gp = upstream.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const acc_t *wp = w.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>();
    const acc_t *meanp = row_mean.data_ptr<acc_t>(), *rstdp = row_rstd.data_ptr<acc_t>();
    acc_t *dzp = channel_dz.data_ptr<acc_t>(), *dzxp = channel_dz_xhat.data_ptr<acc_t>();
    with_activation(activation, [&](auto tag) {
      constexpr Activation kAct = decltype(tag)::value;
      at::parallel_for(0, g.rows(), g.grain(), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> dz(g.row_size());
        for (int64_t r = begin; r < end; ++r) {
          const int64_t first = r * g.channels_per_group();  // the row's first (sample, channel)
          const int64_t first_channel = (r % groups) * g.channels_per_group();
          backward_row<kAct>(gp + first * g.out_plane(), xp + r * g.row_size(),
                             gxp + r * g.row_size(), wp + first_channel, bp + first_channel,
                             meanp[r], rstdp[r], static_cast<acc_t>(slope), dzp + first,
                             dzxp + first, dz.data(), g);
        }
      });
    });
  });
  return {grad_x, sum_over_samples(channel_dz_xhat).to(weight.scalar_type()),
          sum_over_samples(channel_dz).to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(condense, CPU, m) {
  m.impl("embed_epilogue", &embed_epilogue_cpu);
  m.impl("embed_epilogue_backward", &embed_epilogue_backward_cpu);
}

}  // namespace condense
