/// \file accuracy_frontier.cpp
/// The accuracy frontier of issue 3: for the paper's attention layer \f$O = \mathrm{softmax}(c\,XWX^\top)XW_V\f$
/// with the authors' distribution, the relative Frobenius error of \f$O\f$, \f$dX\f$, \f$dW\f$, \f$dW_V\f$ of the
/// paper and adjoint methods against exact attention, and their forward+backward speed-up over the blocked
/// exact method, for \f$d \in \{8, 12, 16\}\f$, \f$g \in \{2, 4, 6\}\f$, causal and not.
///
/// Data: \f$X \sim N(0,1)/\sqrt d\f$, \f$W \sim N(0,1)/\sqrt d\f$ (so \f$Q = XW\f$ and \f$K = X\f$ have the authors'
/// \f$N(0,1)/\sqrt d\f$ entries), \f$W_V \sim N(0,1)\f$ (so \f$V = XW_V\f$ has \f$N(0,1)\f$ entries),
/// \f$G \sim N(0,1)\f$, scale \f$c = 1\f$, one head, double precision for the errors and float for the timings.
///
/// Usage: accuracy_frontier [--n N] [--seed S] [--max-degree G]   (--help lists ranges and defaults)
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "cli.hpp"

namespace {

using polyattn::Index;
template <class T>
using Matrix = polyattn::Matrix<T>;

template <class T>
Matrix<T> normal_matrix(Index rows, Index cols, double sigma, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, sigma);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

double relative_error(const Matrix<double>& approx, const Matrix<double>& exact) {
  return (approx - exact).norm() / exact.norm();
}

/// Inputs of one layer in double and float (the float copy is the rounded double one).
struct LayerInputs {
  Matrix<double> X, W, W_V, G;
  Matrix<float> Xf, Wf, W_Vf, Gf;
};

LayerInputs make_inputs(Index n, Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const double inv_sqrt_d = 1 / std::sqrt(static_cast<double>(d));
  LayerInputs in;
  in.X = normal_matrix<double>(n, d, inv_sqrt_d, rng);
  in.W = normal_matrix<double>(d, d, inv_sqrt_d, rng);
  in.W_V = normal_matrix<double>(d, d, 1.0, rng);
  in.G = normal_matrix<double>(n, d, 1.0, rng);
  in.Xf = in.X.cast<float>();
  in.Wf = in.W.cast<float>();
  in.W_Vf = in.W_V.cast<float>();
  in.Gf = in.G.cast<float>();
  return in;
}

/// Output and gradients of the paper's layer with one backend.
struct LayerResult {
  Matrix<double> O, dX, dW, dW_V;
};

template <class T>
LayerResult run_layer(polyattn::AttentionBackend<T>& backend, const Matrix<T>& X, const Matrix<T>& W,
                      const Matrix<T>& W_V, const Matrix<T>& G) {
  polyattn::MergedQKAttentionLayer<T> layer(backend);
  Matrix<T> O(X.rows(), W_V.cols()), dX = Matrix<T>::Zero(X.rows(), X.cols());
  Matrix<T> dW = Matrix<T>::Zero(W.rows(), W.cols()), dW_V = Matrix<T>::Zero(W_V.rows(), W_V.cols());
  layer.forward(X, W, W_V, O);
  layer.backward(X, W, W_V, G, dX, dW, dW_V);
  return {O.template cast<double>(), dX.template cast<double>(), dW.template cast<double>(),
          dW_V.template cast<double>()};
}

/// Median-of-three float forward+backward time in seconds.
double time_layer(polyattn::AttentionBackend<float>& backend, const LayerInputs& in) {
  double times[3];
  for (double& t : times) {
    const auto start = std::chrono::steady_clock::now();
    run_layer(backend, in.Xf, in.Wf, in.W_Vf, in.Gf);
    t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::sort(std::begin(times), std::end(times));
  return times[1];
}

// The exact references cost O(n^2 d) each (36 of them per run): at the largest n a run takes hours.
constexpr Index max_n = 16384;
constexpr int max_max_degree = 6;

void print_usage(std::ostream& out) {
  out << "usage: accuracy_frontier [--n N] [--seed S] [--max-degree G]\n"
         "\n"
         "Relative error of O, dX, dW, dW_V of the paper's attention layer, paper and adjoint methods against\n"
         "exact attention, and their forward+backward speed-up, for d in {8, 12, 16}, g = 2, 4, ... up to G,\n"
         "causal and not.\n"
         "\n"
         "Options (default in parentheses):\n"
         "  --n N            tokens, 2.."
      << max_n
      << " (4096)\n"
         "  --seed S         seed of the inputs, 0..2^62 (1)\n"
         "  --max-degree G   largest Taylor degree (even degrees from 2 are run), 2.."
      << max_max_degree
      << " (6)\n"
         "  --help           this text\n";
}

}  // namespace

int main(int argc, char** argv) {
  Index n = 4096;
  std::uint64_t seed = 1;
  int max_degree = 6;
  try {
    polyattn_examples::Arguments args(argc, argv);
    while (args.next()) {
      if (args.is("--help") || args.is("-h")) {
        print_usage(std::cout);
        return 0;
      }
      if (args.is("--n")) n = args.integer<Index>(2, max_n);
      else if (args.is("--seed")) seed = args.integer<std::uint64_t>(0, 1LL << 62);
      else if (args.is("--max-degree")) max_degree = args.integer<int>(2, max_max_degree);
      else args.reject();
    }
  } catch (const polyattn_examples::UsageError& error) {
    return polyattn_examples::usage_error("accuracy_frontier", error);
  }
  std::printf("Accuracy frontier of the paper's layer (n = %ld, c = 1, X,W ~ N(0,1)/sqrt(d), W_V,G ~ N(0,1)):\n"
              "relative Frobenius error against exact attention (double); speed-up of float forward+backward\n"
              "over the blocked exact method (median of 3).\n\n",
              static_cast<long>(n));
  std::printf("%-6s %3s %2s %6s | %-7s %9s %9s %9s %9s %9s\n", "mask", "d", "g", "r", "method", "O", "dX", "dW",
              "dW_V", "speed-up");
  for (const bool causal : {false, true}) {
    for (const Index d : {8, 12, 16}) {
      const LayerInputs in = make_inputs(n, d, seed);
      polyattn::AttentionOptions attention;
      attention.scale = 1.0;
      attention.causal = causal;
      polyattn::ExactBlockedBackend<double> exact(attention);
      const LayerResult reference = run_layer<double>(exact, in.X, in.W, in.W_V, in.G);
      polyattn::ExactBlockedBackend<float> exact_float(attention);
      const double exact_time = time_layer(exact_float, in);
      for (int g = 2; g <= max_degree; g += 2) {
        polyattn::PolynomialAttentionOptions options;
        options.attention = attention;
        options.degree = g;
        const Index r = polyattn::feature_width(polyattn::FeatureMapKind::symmetric, d, g);
        for (const polyattn::AttentionMethod method : {polyattn::AttentionMethod::paper, polyattn::AttentionMethod::adjoint}) {
          auto backend = polyattn::make_attention_backend<double>(method, options);
          const LayerResult approx = run_layer<double>(*backend, in.X, in.W, in.W_V, in.G);
          auto backend_float = polyattn::make_attention_backend<float>(method, options);
          const double speedup = exact_time / time_layer(*backend_float, in);
          std::printf("%-6s %3ld %2d %6ld | %-7s %8.3f%% %8.3f%% %8.3f%% %8.3f%% %8.1fx\n",
                      causal ? "causal" : "full", static_cast<long>(d), g, static_cast<long>(r),
                      polyattn::attention_method_name(method), 100 * relative_error(approx.O, reference.O),
                      100 * relative_error(approx.dX, reference.dX), 100 * relative_error(approx.dW, reference.dW),
                      100 * relative_error(approx.dW_V, reference.dW_V), speedup);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}
