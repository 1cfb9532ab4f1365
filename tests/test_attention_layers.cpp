#include <polyattn/nn/attention_layers.hpp>
#include <polyattn/attention/exact_gradients.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>

using Catch::Contains;
using polyattn::AttentionBackend;
using polyattn::AttentionOptions;
using polyattn::ExactBlockedBackend;
using polyattn::ExactBlockedOptions;
using polyattn::ExactReferenceBackend;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::MergedQKAttentionLayer;
using polyattn::ProjectedAttentionLayer;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

// Row-softmax of c X W_l X^T (masked when causal), written out independently of the library.
Matrix<double> softmax_scores(const Matrix<double>& Q, const Matrix<double>& K, double c, bool causal) {
  Matrix<double> P = c * Q * K.transpose();
  for (Index i = 0; i < P.rows(); ++i) {
    const Index visible = causal ? i + 1 : P.cols();
    const double row_max = P.row(i).head(visible).maxCoeff();
    double sum = 0;
    for (Index j = 0; j < P.cols(); ++j) {
      P(i, j) = j < visible ? std::exp(P(i, j) - row_max) : 0.0;
      sum += P(i, j);
    }
    P.row(i) /= sum;
  }
  return P;
}

// The paper's layer for h heads (W = [W_1 | ... | W_h], W_V = [W_V1 | ... | W_Vh]).
Matrix<double> paper_layer_output(const Matrix<double>& X, const Matrix<double>& W, const Matrix<double>& W_V,
                                  double c, bool causal) {
  const Index d = X.cols(), heads = W.cols() / d, dv = W_V.cols() / heads;
  Matrix<double> O(X.rows(), W_V.cols());
  for (Index l = 0; l < heads; ++l)
    O.middleCols(l * dv, dv) = softmax_scores(X * W.middleCols(l * d, d), X, c, causal) * X * W_V.middleCols(l * dv, dv);
  return O;
}

Matrix<double> projected_layer_output(const Matrix<double>& X, const Matrix<double>& W_Q, const Matrix<double>& W_K,
                                      const Matrix<double>& W_V, Index heads, double c, bool causal) {
  const Index dk = W_Q.cols() / heads, dv = W_V.cols() / heads;
  Matrix<double> O(X.rows(), W_V.cols());
  for (Index l = 0; l < heads; ++l)
    O.middleCols(l * dv, dv) =
        softmax_scores(X * W_Q.middleCols(l * dk, dk), X * W_K.middleCols(l * dk, dk), c, causal) * X *
        W_V.middleCols(l * dv, dv);
  return O;
}

std::unique_ptr<AttentionBackend<double>> make_layer_backend(bool blocked, const AttentionOptions& opt) {
  if (!blocked) return std::make_unique<ExactReferenceBackend<double>>(opt);
  // blocks that do not divide n = 10
  return std::make_unique<ExactBlockedBackend<double>>(opt, ExactBlockedOptions{4, 3, 3, 4});
}

}  // namespace

// Central differences: the losses <R, O> are analytic with O(1) derivatives; with h = 1e-6 truncation
// (~1e-13) and rounding (eps |L| / h ~ 1e-9 per entry) give relative errors near 1e-9, so 1e-7 keeps a margin
// of about 100 while a wrong or missing term is an O(1) relative error.
constexpr double fd_tolerance = 1e-7;

TEST_CASE("Paper layer dX, dW, dW_V match central finite differences", "[layer_gradients]") {
  const Index n = 10, d = 4, dv = 2;
  for (const bool blocked : {false, true})
    for (const bool causal : {false, true})
      for (Index heads = 1; heads <= 4; ++heads)
        for (const double c : {1.0 / d, 1.0 / std::sqrt(double(d))}) {
          CAPTURE(blocked, causal, heads, c);
          const auto seed = 40 + 10 * std::uint64_t(heads);
          Matrix<double> X = random_matrix<double>(n, d, seed);
          Matrix<double> W = random_matrix<double>(d, heads * d, seed + 1);
          Matrix<double> W_V = random_matrix<double>(d, heads * dv, seed + 2);
          const Matrix<double> R = random_matrix<double>(n, heads * dv, seed + 3);
          const auto backend = make_layer_backend(blocked, AttentionOptions{c, causal, heads});
          MergedQKAttentionLayer<double> layer(*backend);
          Matrix<double> O(n, heads * dv);
          layer.forward(X, W, W_V, O);
          REQUIRE(relative_error(O, paper_layer_output(X, W, W_V, c, causal)) < 1e-13);
          Matrix<double> dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, heads * d),
                         dW_V = Matrix<double>::Zero(d, heads * dv);
          layer.backward(X, W, W_V, R, dX, dW, dW_V);
          const auto loss = [&] { return (R.array() * paper_layer_output(X, W, W_V, c, causal).array()).sum(); };
          REQUIRE(gradient_error(loss, X, dX) < fd_tolerance);
          REQUIRE(gradient_error(loss, W, dW) < fd_tolerance);
          REQUIRE(gradient_error(loss, W_V, dW_V) < fd_tolerance);
        }
}

TEST_CASE("Paper layer gradients equal the closed forms; the printed Lemma G.3 and D8 do not", "[layer_gradients]") {
  // One head: dW = c X^T p X, dW_V = X^T P^T G, dX = c (p X W^T + p^T X W) + P^T G W_V^T. The paper prints
  // X^T P G and P G W_V^T instead (Lemma G.3, Algorithm 1 line 22, term D8).
  const Index n = 9, d = 3;
  const double c = 1.0 / d;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const Matrix<double> X = random_matrix<double>(n, d, 61), W = random_matrix<double>(d, d, 62),
                         W_V = random_matrix<double>(d, d, 63), G = random_matrix<double>(n, d, 64);
    ExactReferenceBackend<double> exact(AttentionOptions{c, causal, 1});
    MergedQKAttentionLayer<double> layer(exact);
    Matrix<double> O(n, d), dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, d),
                   dW_V = Matrix<double>::Zero(d, d);
    layer.forward(X, W, W_V, O);
    layer.backward(X, W, W_V, G, dX, dW, dW_V);

    const Matrix<double> P = softmax_scores(X * W, X, c, causal);
    const Matrix<double> V = X * W_V;
    const Eigen::VectorXd kappa = (P * V).cwiseProduct(G).rowwise().sum();
    const Matrix<double> p = P.cwiseProduct(G * V.transpose()) - kappa.asDiagonal() * P;
    // a few dozen O(1) products per entry: agreement to rounding
    REQUIRE(relative_error(dW, c * X.transpose() * p * X) < 1e-13);
    REQUIRE(relative_error(dW_V, X.transpose() * P.transpose() * G) < 1e-13);
    REQUIRE(relative_error(dX, c * (p * X * W.transpose() + p.transpose() * X * W) +
                                   P.transpose() * G * W_V.transpose()) < 1e-13);
    // The printed forms are off by O(1) (for these seeds by more than 10 %).
    REQUIRE(relative_error(X.transpose() * P * G, dW_V) > 0.1);
    const Matrix<double> printed_dX =
        c * (p * X * W.transpose() + p.transpose() * X * W) + P * G * W_V.transpose();
    REQUIRE(relative_error(printed_dX, dX) > 0.1);
  }
}

TEST_CASE("Projected layer dX, dW_Q, dW_K, dW_V match central finite differences", "[layer_gradients]") {
  const Index n = 10, d_model = 5, dk = 3, dv = 2;
  for (const bool blocked : {false, true})
    for (const bool causal : {false, true})
      for (Index heads = 1; heads <= 4; ++heads)
        for (const double c : {1.0 / dk, 1.0 / std::sqrt(double(dk))}) {
          CAPTURE(blocked, causal, heads, c);
          const auto seed = 80 + 10 * std::uint64_t(heads);
          Matrix<double> X = random_matrix<double>(n, d_model, seed);
          Matrix<double> W_Q = random_matrix<double>(d_model, heads * dk, seed + 1);
          Matrix<double> W_K = random_matrix<double>(d_model, heads * dk, seed + 2);
          Matrix<double> W_V = random_matrix<double>(d_model, heads * dv, seed + 3);
          const Matrix<double> R = random_matrix<double>(n, heads * dv, seed + 4);
          const auto backend = make_layer_backend(blocked, AttentionOptions{c, causal, heads});
          ProjectedAttentionLayer<double> layer(*backend);
          Matrix<double> O(n, heads * dv);
          layer.forward(X, W_Q, W_K, W_V, O);
          REQUIRE(relative_error(O, projected_layer_output(X, W_Q, W_K, W_V, heads, c, causal)) < 1e-13);
          Matrix<double> dX = Matrix<double>::Zero(n, d_model), dW_Q = Matrix<double>::Zero(d_model, heads * dk),
                         dW_K = Matrix<double>::Zero(d_model, heads * dk),
                         dW_V = Matrix<double>::Zero(d_model, heads * dv);
          layer.backward(X, W_Q, W_K, W_V, R, dX, dW_Q, dW_K, dW_V);
          const auto loss = [&] {
            return (R.array() * projected_layer_output(X, W_Q, W_K, W_V, heads, c, causal).array()).sum();
          };
          REQUIRE(gradient_error(loss, X, dX) < fd_tolerance);
          REQUIRE(gradient_error(loss, W_Q, dW_Q) < fd_tolerance);
          REQUIRE(gradient_error(loss, W_K, dW_K) < fd_tolerance);
          REQUIRE(gradient_error(loss, W_V, dW_V) < fd_tolerance);
        }
}

TEST_CASE("dW_Q = dW W_K and dW_K = dW^T W_Q relate the two layer forms", "[layer_gradients]") {
  // Same function through W = W_Q W_K^T and the same scale: the chain rule through the product. Both sides
  // are short sums of O(1) products: agreement to rounding, 1e-12.
  const Index n = 12, d = 4, dk = 2;
  const double c = 0.5;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const Matrix<double> X = random_matrix<double>(n, d, 71), W_Q = random_matrix<double>(d, dk, 72),
                         W_K = random_matrix<double>(d, dk, 73), W_V = random_matrix<double>(d, d, 74),
                         G = random_matrix<double>(n, d, 75);
    const Matrix<double> W = W_Q * W_K.transpose();
    ExactBlockedBackend<double> paper_backend(AttentionOptions{c, causal, 1});
    ExactBlockedBackend<double> projected_backend(AttentionOptions{c, causal, 1});
    MergedQKAttentionLayer<double> paper(paper_backend);
    ProjectedAttentionLayer<double> projected(projected_backend);
    Matrix<double> O_paper(n, d), O_projected(n, d);
    paper.forward(X, W, W_V, O_paper);
    projected.forward(X, W_Q, W_K, W_V, O_projected);
    REQUIRE(relative_error(O_projected, O_paper) < 1e-12);
    Matrix<double> dX_paper = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, d),
                   dW_V_paper = Matrix<double>::Zero(d, d);
    paper.backward(X, W, W_V, G, dX_paper, dW, dW_V_paper);
    Matrix<double> dX = Matrix<double>::Zero(n, d), dW_Q = Matrix<double>::Zero(d, dk),
                   dW_K = Matrix<double>::Zero(d, dk), dW_V = Matrix<double>::Zero(d, d);
    projected.backward(X, W_Q, W_K, W_V, G, dX, dW_Q, dW_K, dW_V);
    REQUIRE(relative_error(dW_Q, dW * W_K) < 1e-12);
    REQUIRE(relative_error(dW_K, dW.transpose() * W_Q) < 1e-12);
    REQUIRE(relative_error(dW_V, dW_V_paper) < 1e-12);
    REQUIRE(relative_error(dX, dX_paper) < 1e-12);
  }
}

TEST_CASE("Layer backward accumulates into dX and the weight gradients", "[layer_gradients]") {
  // Two backward calls on top of random initial contents give initial + 2 x one call, up to rounding.
  const Index n = 7, d = 3, heads = 2;
  const Matrix<double> X = random_matrix<double>(n, d, 91), W = random_matrix<double>(d, heads * d, 92),
                       W_V = random_matrix<double>(d, heads * d, 93), G = random_matrix<double>(n, heads * d, 94);
  ExactBlockedBackend<double> exact(AttentionOptions{std::nullopt, true, heads});
  SECTION("paper layer") {
    MergedQKAttentionLayer<double> layer(exact);
    Matrix<double> O(n, heads * d);
    layer.forward(X, W, W_V, O);
    Matrix<double> dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, heads * d),
                   dW_V = Matrix<double>::Zero(d, heads * d);
    layer.backward(X, W, W_V, G, dX, dW, dW_V);
    const Matrix<double> dX0 = random_matrix<double>(n, d, 95), dW0 = random_matrix<double>(d, heads * d, 96),
                         dW_V0 = random_matrix<double>(d, heads * d, 97);
    Matrix<double> dX2 = dX0, dW2 = dW0, dW_V2 = dW_V0;
    layer.backward(X, W, W_V, G, dX2, dW2, dW_V2);
    layer.backward(X, W, W_V, G, dX2, dW2, dW_V2);
    REQUIRE(relative_error(dX2, dX0 + 2 * dX) < 1e-14);
    REQUIRE(relative_error(dW2, dW0 + 2 * dW) < 1e-14);
    REQUIRE(relative_error(dW_V2, dW_V0 + 2 * dW_V) < 1e-14);
  }
  SECTION("projected layer") {
    ProjectedAttentionLayer<double> layer(exact);
    Matrix<double> O(n, heads * d);
    layer.forward(X, W, W, W_V, O);
    Matrix<double> dX = Matrix<double>::Zero(n, d), dW_Q = Matrix<double>::Zero(d, heads * d),
                   dW_K = Matrix<double>::Zero(d, heads * d), dW_V = Matrix<double>::Zero(d, heads * d);
    layer.backward(X, W, W, W_V, G, dX, dW_Q, dW_K, dW_V);
    const Matrix<double> dX0 = random_matrix<double>(n, d, 98), dW0 = random_matrix<double>(d, heads * d, 99);
    Matrix<double> dX2 = dX0, dW_Q2 = dW0, dW_K2 = dW0, dW_V2 = dW0;
    layer.backward(X, W, W, W_V, G, dX2, dW_Q2, dW_K2, dW_V2);
    layer.backward(X, W, W, W_V, G, dX2, dW_Q2, dW_K2, dW_V2);
    REQUIRE(relative_error(dX2, dX0 + 2 * dX) < 1e-14);
    REQUIRE(relative_error(dW_Q2, dW0 + 2 * dW_Q) < 1e-14);
    REQUIRE(relative_error(dW_K2, dW0 + 2 * dW_K) < 1e-14);
    REQUIRE(relative_error(dW_V2, dW0 + 2 * dW_V) < 1e-14);
  }
}

TEST_CASE("Paper layer in float on the blocked backend agrees with double", "[layer_gradients]") {
  // As for the raw float check (test_exact_gradients.cpp): relative errors of a few u = 6e-8 per score,
  // measured below 1e-6 here, plus the O(u) rounding of the O(n d^2) layer products; 1e-5 keeps a margin of 10.
  const Index n = 100, d = 8, heads = 2;
  const Matrix<double> X = random_matrix<double>(n, d, 111), W = random_matrix<double>(d, heads * d, 112, 0.3),
                       W_V = random_matrix<double>(d, heads * d, 113), G = random_matrix<double>(n, heads * d, 114);
  ExactReferenceBackend<double> reference(AttentionOptions{1.0 / d, true, heads});
  ExactBlockedBackend<float> blocked(AttentionOptions{1.0 / d, true, heads}, ExactBlockedOptions{32, 16, 24, 40});
  MergedQKAttentionLayer<double> exact(reference);
  MergedQKAttentionLayer<float> fast(blocked);
  Matrix<double> O(n, heads * d), dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, heads * d),
                 dW_V = Matrix<double>::Zero(d, heads * d);
  exact.forward(X, W, W_V, O);
  exact.backward(X, W, W_V, G, dX, dW, dW_V);
  const Matrix<float> Xf = X.cast<float>(), Wf = W.cast<float>(), W_Vf = W_V.cast<float>(), Gf = G.cast<float>();
  Matrix<float> Of(n, heads * d), dXf = Matrix<float>::Zero(n, d), dWf = Matrix<float>::Zero(d, heads * d),
                dW_Vf = Matrix<float>::Zero(d, heads * d);
  fast.forward(Xf, Wf, W_Vf, Of);
  fast.backward(Xf, Wf, W_Vf, Gf, dXf, dWf, dW_Vf);
  CHECK(relative_error(Of, O) < 1e-5);
  CHECK(relative_error(dXf, dX) < 1e-5);
  CHECK(relative_error(dWf, dW) < 1e-5);
  CHECK(relative_error(dW_Vf, dW_V) < 1e-5);
}

TEST_CASE("Layers reject bad input with the argument's name", "[layer_gradients]") {
  const Index n = 6, d = 3, heads = 2;
  const Matrix<double> X = random_matrix<double>(n, d, 121), W = random_matrix<double>(d, heads * d, 122),
                       W_V = random_matrix<double>(d, heads * d, 123), G = random_matrix<double>(n, heads * d, 124);
  ExactReferenceBackend<double> exact(AttentionOptions{std::nullopt, false, heads});
  MergedQKAttentionLayer<double> paper(exact);
  ProjectedAttentionLayer<double> projected(exact);
  Matrix<double> O(n, heads * d), dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, heads * d),
                 dW_V = Matrix<double>::Zero(d, heads * d), dW_K = dW;

  SECTION("backward before forward") {
    REQUIRE_THROWS_WITH(paper.backward(X, W, W_V, G, dX, dW, dW_V), Contains("preceding forward()"));
    REQUIRE_THROWS_WITH(projected.backward(X, W, W, W_V, G, dX, dW, dW_K, dW_V), Contains("preceding forward()"));
  }
  SECTION("W and W_V of the wrong shape") {
    const Matrix<double> W_bad = random_matrix<double>(d, 5, 125);
    REQUIRE_THROWS_AS(paper.forward(X, W_bad, W_V, O), std::invalid_argument);
    REQUIRE_THROWS_WITH(paper.forward(X, W_bad, W_V, O), Contains("'W' must be 3x(heads*3)") && Contains("3x5"));
    const Matrix<double> W_V_bad = random_matrix<double>(d, 5, 126);
    REQUIRE_THROWS_WITH(paper.forward(X, W, W_V_bad, O), Contains("'W_V' must be 3x(2*d_v)") && Contains("3x5"));
    const Matrix<double> W_V_rows = random_matrix<double>(d + 1, heads * d, 127);
    REQUIRE_THROWS_WITH(paper.forward(X, W, W_V_rows, O), Contains("'W_V'") && Contains("4x6"));
    const Matrix<double> W_K_bad = random_matrix<double>(d, heads * d + 1, 128);
    REQUIRE_THROWS_WITH(projected.forward(X, W, W_K_bad, W_V, O), Contains("'W_K' must be 3x6, got 3x7"));
  }
  SECTION("G and gradient outputs of the wrong shape") {
    paper.forward(X, W, W_V, O);
    const Matrix<double> G_bad = G.topRows(n - 1);
    REQUIRE_THROWS_WITH(paper.backward(X, W, W_V, G_bad, dX, dW, dW_V), Contains("'G' must be 6x6, got 5x6"));
    Matrix<double> dW_bad = Matrix<double>::Zero(d, d);
    REQUIRE_THROWS_WITH(paper.backward(X, W, W_V, G, dX, dW_bad, dW_V), Contains("'dW' must be 3x6, got 3x3"));
    REQUIRE_THROWS_WITH(paper.backward(X, W, W_V, G, dX, dW, dW_bad), Contains("'dW_V' must be 3x6, got 3x3"));
    projected.forward(X, W, W, W_V, O);
    REQUIRE_THROWS_WITH(projected.backward(X, W, W, W_V, G_bad, dX, dW, dW_K, dW_V), Contains("'G' must be 6x6"));
  }
  SECTION("NaN in X, W or G") {
    Matrix<double> X_nan = X;
    X_nan(2, 1) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_WITH(paper.forward(X_nan, W, W_V, O), Contains("'X' has a non-finite entry") && Contains("(2, 1)"));
    Matrix<double> W_nan = W;
    W_nan(0, 4) = std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_WITH(paper.forward(X, W_nan, W_V, O), Contains("'W' has a non-finite entry"));
    REQUIRE_THROWS_WITH(projected.forward(X, W, W_nan, W_V, O), Contains("'W_K' has a non-finite entry"));
    paper.forward(X, W, W_V, O);
    Matrix<double> G_nan = G;
    G_nan(5, 5) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_WITH(paper.backward(X, W, W_V, G_nan, dX, dW, dW_V), Contains("'G' has a non-finite entry"));
  }
  SECTION("n = 0") {
    const Matrix<double> empty(0, d);
    Matrix<double> O0(0, heads * d);
    REQUIRE_THROWS_WITH(paper.forward(empty, W, W_V, O0), Contains("'X' must be non-empty"));
    REQUIRE_THROWS_WITH(projected.forward(empty, W, W, W_V, O0), Contains("'X' must be non-empty"));
  }
}

TEST_CASE("MergedQKAttentionLayer rejects weights for another number of heads than its backend's",
          "[attention_layers][heads]") {
  const Index n = 8, d = 3, dv = 2;
  const Matrix<double> X = random_matrix<double>(n, d, 110), W = random_matrix<double>(d, 2 * d, 111),
                       W_V = random_matrix<double>(d, 2 * dv, 112);
  ExactBlockedBackend<double> one_head(AttentionOptions{std::nullopt, true, 1});
  MergedQKAttentionLayer<double> layer(one_head);
  Matrix<double> O(n, 2 * dv);
  REQUIRE_THROWS_AS(layer.forward(X, W, W_V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(layer.forward(X, W, W_V, O), Contains("MergedQKAttentionLayer::forward") && Contains("'W'") &&
                                                       Contains("'heads' = 1"));
  Matrix<double> dX(n, d), dW(d, 2 * d), dW_V(d, 2 * dv);
  REQUIRE_THROWS_WITH(layer.backward(X, W, W_V, O, dX, dW, dW_V),
                      Contains("MergedQKAttentionLayer::backward") && Contains("'heads' = 1"));
  ExactBlockedBackend<double> two_heads(AttentionOptions{std::nullopt, true, 2});
  MergedQKAttentionLayer<double> matching(two_heads);
  matching.forward(X, W, W_V, O);
  REQUIRE(O.allFinite());
}

TEST_CASE("ProjectedAttentionLayer checks a stated head count against its backend", "[attention_layers][heads]") {
  ExactBlockedBackend<float> one_head(AttentionOptions{std::nullopt, false, 1});
  REQUIRE_THROWS_AS(ProjectedAttentionLayer<float>(one_head, 2), std::invalid_argument);
  REQUIRE_THROWS_WITH(ProjectedAttentionLayer<float>(one_head, 2),
                      Contains("ProjectedAttentionLayer") && Contains("'heads' = 2") && Contains("'heads' = 1"));
  REQUIRE(ProjectedAttentionLayer<float>(one_head, 1).heads() == 1);
  REQUIRE(ProjectedAttentionLayer<float>(one_head).heads() == 1);
}

TEST_CASE("Attention layers reject outputs overlapping inputs or each other", "[attention_layers][aliasing]") {
  const Index n = 6, d = 3;
  Matrix<double> X = random_matrix<double>(n, d, 120), W = random_matrix<double>(d, d, 121),
                 W_V = random_matrix<double>(d, d, 122), G = random_matrix<double>(n, d, 123);
  ExactReferenceBackend<double> exact(AttentionOptions{std::nullopt, true, 1});
  MergedQKAttentionLayer<double> merged(exact);
  Matrix<double> O(n, d), dX = Matrix<double>::Zero(n, d), dW = Matrix<double>::Zero(d, d),
                 dW_V = Matrix<double>::Zero(d, d);
  REQUIRE_THROWS_WITH(merged.forward(X, W, W_V, X),
                      Contains("MergedQKAttentionLayer::forward") && Contains("'O'") && Contains("'X'"));
  merged.forward(X, W, W_V, O);
  REQUIRE_THROWS_AS(merged.backward(X, W, W_V, G, X, dW, dW_V), std::invalid_argument);
  REQUIRE_THROWS_WITH(merged.backward(X, W, W_V, G, X, dW, dW_V),
                      Contains("MergedQKAttentionLayer::backward") && Contains("'dX'") && Contains("'X'"));
  REQUIRE_THROWS_WITH(merged.backward(X, W, W_V, G, dX, W, dW_V), Contains("'dW'") && Contains("'W'"));
  REQUIRE_THROWS_WITH(merged.backward(X, W, W_V, G, dX, dW, dW), Contains("'dW'") && Contains("'dW_V'"));
  REQUIRE(dW.isZero());
  ProjectedAttentionLayer<double> projected(exact);
  const Matrix<double> W_K = random_matrix<double>(d, d, 124);
  REQUIRE_THROWS_WITH(projected.forward(X, W, W_K, W_V, X),
                      Contains("ProjectedAttentionLayer::forward") && Contains("'O'") && Contains("'X'"));
  projected.forward(X, W, W_K, W_V, O);
  Matrix<double> W_K_copy = W_K, dW_K = Matrix<double>::Zero(d, d);
  REQUIRE_THROWS_AS(projected.backward(X, W, W_K_copy, W_V, G, dX, dW, W_K_copy, dW_V), std::invalid_argument);
  REQUIRE_THROWS_WITH(projected.backward(X, W, W_K_copy, W_V, G, dX, dW, W_K_copy, dW_V),
                      Contains("ProjectedAttentionLayer::backward") && Contains("'dW_K'") && Contains("'W_K'"));
  REQUIRE_THROWS_WITH(projected.backward(X, W, W_K, W_V, G, dX, dW, dW_K, dW_K), Contains("'dW_K'") &&
                                                                                     Contains("'dW_V'"));
  REQUIRE(dX.isZero());
}
