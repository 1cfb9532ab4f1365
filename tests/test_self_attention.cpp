#include <polyattn/nn/self_attention.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AttentionMethod;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::SelfAttention;
using polyattn::SelfAttentionOptions;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::trainable_parameters;

namespace {

SelfAttentionOptions layer_options(Index d_model, Index heads, AttentionMethod method, bool bias = false) {
  SelfAttentionOptions options;
  options.d_model = d_model;
  options.heads = heads;
  options.method = method;
  options.bias = bias;
  options.seed = 7;
  return options;
}

void randomise_biases(SelfAttention<double>& layer, std::uint64_t seed) {
  std::vector<polyattn::Parameter<double>*> parameters;
  layer.collect_parameters(parameters);
  for (polyattn::Parameter<double>* p : parameters)
    if (p->rows() == 1) p->value = random_matrix<double>(1, p->cols(), seed++, 0.3);
}

// check_gradients for an attention layer: dX and every parameter gradient against central differences of
// <R, Y>, except the key biases.
void check_attention_gradient(SelfAttention<double>& layer, const Matrix<double>& X, const Matrix<double>& R,
                              double tolerance) {
  // A key bias adds q_i.b to every score of row i, which the softmax cancels: its gradient is exactly zero,
  // so there is no relative error to take; the analytic one must vanish up to rounding of O(1) terms.
  std::vector<polyattn::Parameter<double>*> compared, key_biases;
  for (polyattn::Parameter<double>* p : trainable_parameters(layer))
    (p->name.find(".wk.bias") != std::string::npos ? key_biases : compared).push_back(p);
  check_gradients(layer, X, R, compared, tolerance);
  for (const polyattn::Parameter<double>* p : key_biases) {
    CAPTURE(p->name);
    CHECK(p->grad.norm() < 1e-12);
  }
}

}  // namespace

TEST_CASE("SelfAttention backward matches central finite differences (exact backends)", "[self_attention]") {
  // The layer is smooth with O(1) derivatives at this scale; with h = 1e-6 central differences are accurate to
  // O(h^2) truncation + O(eps |L| / h) rounding, about 1e-10 relative: 1e-7 leaves three digits of margin.
  const double tolerance = 1e-7;
  const Index n = 9, d = 6;
  for (const AttentionMethod method : {AttentionMethod::exact_reference, AttentionMethod::exact_blocked})
    for (const Index heads : {1, 2, 3})
      for (const bool bias : {false, true}) {
        CAPTURE(polyattn::attention_method_name(method), heads, bias);
        SelfAttention<double> layer(layer_options(d, heads, method, bias), "attn");
        if (bias) randomise_biases(layer, 40);
        check_attention_gradient(layer, random_matrix<double>(n, d, 1), random_matrix<double>(n, d, 2), tolerance);
      }
}

TEST_CASE("SelfAttention without the causal mask also matches finite differences", "[self_attention]") {
  const double tolerance = 1e-7;  // as above
  SelfAttentionOptions options = layer_options(4, 2, AttentionMethod::exact_reference);
  options.causal = false;
  options.scale = 0.25;  // the paper's 1/d
  SelfAttention<double> layer(options);
  check_attention_gradient(layer, random_matrix<double>(7, 4, 3), random_matrix<double>(7, 4, 4), tolerance);
}

TEST_CASE("SelfAttention forward is the explicit multi-head formula", "[self_attention]") {
  const Index n = 8, d = 6, heads = 2, dh = 3;
  SelfAttention<double> layer(layer_options(d, heads, AttentionMethod::exact_blocked));
  const Matrix<double> X = random_matrix<double>(n, d, 5);
  Matrix<double> Y(n, d);
  layer.forward(X, Y);
  const Matrix<double> Q = X * layer.query.weight.value, K = X * layer.key.weight.value;
  const Matrix<double> V = X * layer.value.weight.value;
  Matrix<double> A(n, d);
  for (Index h = 0; h < heads; ++h) {
    Matrix<double> P = Q.middleCols(h * dh, dh) * K.middleCols(h * dh, dh).transpose() / std::sqrt(double(dh));
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < n; ++j) P(i, j) = j <= i ? std::exp(P(i, j)) : 0.0;
    const polyattn::Vector<double> row_sum = P.rowwise().sum();
    P = row_sum.cwiseInverse().asDiagonal() * P;
    A.middleCols(h * dh, dh) = P * V.middleCols(h * dh, dh);
  }
  // a handful of O(1) operations per entry: rounding of a few ulps
  REQUIRE(relative_error(Y, A * layer.output.weight.value) < 1e-13);
}

TEST_CASE("SelfAttention backward accumulates and blocked equals reference", "[self_attention]") {
  const Index n = 11, d = 8;
  const Matrix<double> X = random_matrix<double>(n, d, 6), R = random_matrix<double>(n, d, 7);
  const Matrix<double> dX0 = random_matrix<double>(n, d, 8);
  SelfAttention<double> reference(layer_options(d, 2, AttentionMethod::exact_reference));
  SelfAttention<double> blocked(layer_options(d, 2, AttentionMethod::exact_blocked));
  Matrix<double> Y(n, d), dX_reference = dX0, dX_blocked = dX0;
  reference.forward(X, Y);
  reference.backward(X, R, dX_reference);
  blocked.forward(X, Y);
  blocked.backward(X, R, dX_blocked);
  blocked.backward(X, R, dX_blocked);
  // Both compute the same sums in different orders: agreement to rounding, 1e-12 relative.
  REQUIRE(relative_error(dX_blocked - dX0, 2 * (dX_reference - dX0)) < 1e-12);
  REQUIRE(relative_error(blocked.query.weight.grad, 2 * reference.query.weight.grad) < 1e-12);
  REQUIRE(relative_error(blocked.output.weight.grad, 2 * reference.output.weight.grad) < 1e-12);
}

TEST_CASE("SelfAttention works in float", "[self_attention]") {
  const Index n = 10, d = 8;
  SelfAttention<float> single(layer_options(d, 2, AttentionMethod::exact_blocked));
  SelfAttention<double> twin(layer_options(d, 2, AttentionMethod::exact_blocked));
  const auto pass = float_double_pass(twin, single, random_matrix<double>(n, d, 9), random_matrix<double>(n, d, 10));
  // The float weights are the rounded double weights (same seed); a few hundred float roundings of O(1)
  // values: well below 1e-4 relative.
  REQUIRE(relative_error(pass.Yf, pass.Y) < 1e-4);
  REQUIRE(relative_error(pass.dXf, pass.dX) < 1e-4);
  REQUIRE(relative_error(single.key.weight.grad, twin.key.weight.grad) < 1e-4);
}

TEST_CASE("SelfAttention with the adjoint backend is the exact gradient of the approximate layer",
          "[self_attention]") {
  // The adjoint method differentiates the polynomial forward pass exactly, so finite differences of that
  // same (smooth) function agree to the usual central-difference accuracy of ~1e-10; 1e-7 as above.
  const double tolerance = 1e-7;
  for (const int degree : {2, 4}) {
    CAPTURE(degree);
    SelfAttentionOptions options = layer_options(6, 2, AttentionMethod::adjoint);
    options.approximation.degree = degree;
    options.approximation.chunk_size = 4;  // several causal chunks, the last one partial (n = 10)
    SelfAttention<double> layer(options);
    check_attention_gradient(layer, random_matrix<double>(10, 6, 11, 0.5), random_matrix<double>(10, 6, 12),
                             tolerance);
  }
}

TEST_CASE("SelfAttention: adjoint and exact gradients agree within the certified tolerance", "[self_attention]") {
  // Bounded-entry regime: small inputs keep every score c q.k in [-R, R] with R well below 1, where the
  // degree-4 Taylor polynomial has relative error eps = O(R^5/120). The backend's certificate then bounds
  // every entry of dQ, dK (dqk_bound) and dV (dv_bound); the layer's dX and weight gradients are those
  // through linear maps, so we compare the raw products the certificate covers through the backend itself.
  const Index n = 64, d = 8;
  SelfAttentionOptions options = layer_options(d, 2, AttentionMethod::adjoint);
  options.approximation.degree = 4;
  SelfAttention<double> approximate(options);
  SelfAttention<double> exact(layer_options(d, 2, AttentionMethod::exact_reference));
  const Matrix<double> X = random_matrix<double>(n, d, 13, 0.25), R = random_matrix<double>(n, d, 14);
  Matrix<double> Y_exact(n, d), Y_approx(n, d);
  Matrix<double> dX_exact = Matrix<double>::Zero(n, d), dX_approx = Matrix<double>::Zero(n, d);
  exact.forward(X, Y_exact);
  exact.backward(X, R, dX_exact);
  approximate.forward(X, Y_approx);
  approximate.backward(X, R, dX_approx);
  const polyattn::GradientCertificate& certificate = approximate.gradient_certificate();
  REQUIRE_FALSE(certificate.forward.vacuous());
  REQUIRE(std::isfinite(certificate.dqk_bound));
  REQUIRE(std::isfinite(certificate.dv_bound));
  // Entrywise bounds on dQ, dK, dV propagate to dX = dQ W_Q^T + dK W_K^T + dV W_V^T with
  // |dX_ij| error <= sum over the d columns of |W| times the bound; likewise dW_Q = X^T dQ etc.
  const double wq = exact.query.weight.value.cwiseAbs().rowwise().sum().maxCoeff();
  const double wk = exact.key.weight.value.cwiseAbs().rowwise().sum().maxCoeff();
  const double wv = exact.value.weight.value.cwiseAbs().rowwise().sum().maxCoeff();
  const double dx_bound = certificate.dqk_bound * (wq + wk) + certificate.dv_bound * wv;
  CHECK((dX_approx - dX_exact).cwiseAbs().maxCoeff() <= dx_bound);
  const double x_colsum = X.cwiseAbs().colwise().sum().maxCoeff();
  CHECK((approximate.query.weight.grad - exact.query.weight.grad).cwiseAbs().maxCoeff() <=
        x_colsum * certificate.dqk_bound);
  CHECK((approximate.value.weight.grad - exact.value.weight.grad).cwiseAbs().maxCoeff() <=
        x_colsum * certificate.dv_bound);
  // The bound is not vacuous: the error is small in absolute terms too.
  CHECK(relative_error(dX_approx, dX_exact) < 1e-2);
}

TEST_CASE("SelfAttention set_method keeps the weights", "[self_attention]") {
  const Index n = 6, d = 4;
  SelfAttention<double> layer(layer_options(d, 2, AttentionMethod::exact_reference));
  const Matrix<double> X = random_matrix<double>(n, d, 15);
  Matrix<double> Y_reference(n, d), Y_blocked(n, d);
  layer.forward(X, Y_reference);
  const Matrix<double> wq = layer.query.weight.value;
  layer.set_method(AttentionMethod::exact_blocked);
  REQUIRE(layer.method() == AttentionMethod::exact_blocked);
  REQUIRE(layer.backend().method() == AttentionMethod::exact_blocked);
  layer.forward(X, Y_blocked);
  REQUIRE(layer.query.weight.value == wq);
  REQUIRE(relative_error(Y_blocked, Y_reference) < 1e-13);  // same maths, rounding only
}

TEST_CASE("SelfAttention rejects bad options and input", "[self_attention]") {
  REQUIRE_THROWS_WITH(SelfAttention<double>(layer_options(6, 4, AttentionMethod::exact_blocked)),
                      Contains("'heads'") && Contains("divide"));
  REQUIRE_THROWS_WITH(SelfAttention<double>(layer_options(0, 1, AttentionMethod::exact_blocked)),
                      Contains("'d_model'"));
  SelfAttentionOptions bad_gain = layer_options(4, 1, AttentionMethod::exact_blocked);
  bad_gain.output_gain = 0;
  REQUIRE_THROWS_WITH(SelfAttention<double>(bad_gain), Contains("output_gain"));
  SelfAttentionOptions bad_scale = layer_options(4, 1, AttentionMethod::exact_blocked);
  bad_scale.scale = 0.0;
  REQUIRE_THROWS_WITH(SelfAttention<double>(bad_scale), Contains("'scale'"));
  SelfAttentionOptions bad_window = layer_options(4, 1, AttentionMethod::adjoint);
  bad_window.approximation.exact_window = -1;
  REQUIRE_THROWS_WITH(SelfAttention<double>(bad_window), Contains("'exact_window'"));
  REQUIRE_THROWS_WITH(polyattn::parse_attention_method("fast"), Contains("exact_blocked") && Contains("'fast'"));

  SelfAttention<double> layer(layer_options(4, 2, AttentionMethod::exact_blocked));
  Matrix<double> X = random_matrix<double>(5, 4, 16), Y(5, 4), dX = Matrix<double>::Zero(5, 4);
  REQUIRE_THROWS_WITH(layer.backward(X, Y, dX), Contains("SelfAttention::backward") && Contains("forward()"));
  Matrix<double> Y_wrong(5, 3);
  REQUIRE_THROWS_WITH(layer.forward(X, Y_wrong), Contains("'Y'") && Contains("5x4"));
  Matrix<double> X_wrong = random_matrix<double>(5, 3, 17);
  REQUIRE_THROWS_WITH(layer.forward(X_wrong, Y), Contains("'X'"));
  X(2, 1) = std::nan("");
  REQUIRE_THROWS_WITH(layer.forward(X, Y), Contains("non-finite"));
  X(2, 1) = 0;
  layer.forward(X, Y);
  Matrix<double> dY_wrong(4, 4);
  REQUIRE_THROWS_WITH(layer.backward(X, dY_wrong, dX), Contains("'dY'"));
}
