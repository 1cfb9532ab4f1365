#include <polyattn/nn/parameter.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Parameter;

TEST_CASE("Parameter starts at zero with a gradient of the same shape", "[parameter]") {
  Parameter<float> p("wte", 5, 3, true, false);
  REQUIRE(p.name == "wte");
  REQUIRE(p.rows() == 5);
  REQUIRE(p.cols() == 3);
  REQUIRE(p.size() == 15);
  REQUIRE(p.value.isZero(0));
  REQUIRE(p.grad.isZero(0));
  REQUIRE(p.trainable);
  REQUIRE_FALSE(p.weight_decay);
  REQUIRE_NOTHROW(p.check());

  p.grad.setOnes();
  p.zero_grad();
  REQUIRE(p.grad.isZero(0));

  p.value.resize(2, 2);
  REQUIRE_THROWS_WITH(p.check(), Contains("Parameter::check") && Contains("'wte'") && Contains("2x2") &&
                                     Contains("5x3"));
  p.zero_grad();  // follows the reassigned value
  REQUIRE(p.grad.rows() == 2);
  REQUIRE(p.grad.cols() == 2);

  REQUIRE_THROWS_WITH((Parameter<double>("bad", -1, 2)), Contains("'bad'") && Contains("-1x2"));
}

TEST_CASE("require_parameter_shape names the parameter and both shapes", "[parameter]") {
  Parameter<double> p("block0.ln.gain", 1, 8);
  REQUIRE_NOTHROW(polyattn::detail::require_parameter_shape("LayerNorm::forward", p, 1, 8));
  REQUIRE_THROWS_WITH(polyattn::detail::require_parameter_shape("LayerNorm::forward", p, 1, 4),
                      Contains("LayerNorm::forward") && Contains("'block0.ln.gain'") && Contains("1x4") &&
                          Contains("1x8"));
  p.grad.resize(0, 0);
  REQUIRE_THROWS_WITH(polyattn::detail::require_parameter_shape("LayerNorm::forward", p, 1, 8), Contains("0x0"));
}

TEST_CASE("Parameter lists: zero_grads and count_trainable", "[parameter]") {
  Parameter<double> a("a", 2, 3), b("b", 4, 1, false), c("c", 1, 5);
  const std::vector<Parameter<double>*> list{&a, &b, &c};
  for (Parameter<double>* p : list) p->grad.setOnes();
  polyattn::zero_grads(list);
  for (const Parameter<double>* p : list) REQUIRE(p->grad.isZero(0));
  REQUIRE(polyattn::count_trainable(list) == 6 + 5);
}

TEST_CASE("fill_normal is reproducible, seed dependent and identical in float and double", "[parameter]") {
  Matrix<double> a(40, 30), b(40, 30), c(40, 30);
  Matrix<float> f(40, 30);
  polyattn::fill_normal(a, 0.5, 7);
  polyattn::fill_normal(b, 0.5, 7);
  polyattn::fill_normal(c, 0.5, 8);
  polyattn::fill_normal(f, 0.5, 7);
  REQUIRE(a == b);
  REQUIRE((a - c).cwiseAbs().minCoeff() > 0);
  REQUIRE(f == a.cast<float>());
  // Pinned first draws guard reproducibility across platforms and releases: mt19937_64 is fixed by the
  // standard, the rest is Box-Muller in double, whose libm calls are accurate to an ulp or two (hence 1e-14).
  Matrix<double> first(3, 1);
  polyattn::fill_normal(first, 1.0, 7);
  REQUIRE(first(0, 0) == Approx(0.7130298338875809).epsilon(1e-14));
  REQUIRE(first(1, 0) == Approx(-0.23514359878547864).epsilon(1e-14));
  REQUIRE(first(2, 0) == Approx(1.6105563141402484).epsilon(1e-14));
  REQUIRE_THROWS_WITH(polyattn::fill_normal(a, -1.0, 7), Contains("fill_normal") && Contains("'stddev'"));
}

TEST_CASE("SeededNormal draws standard normal variates", "[parameter]") {
  const int count = 40000;
  polyattn::detail::SeededNormal normal(2024);
  double sum = 0, sum_squares = 0, lag_product = 0, previous = 0;
  int within_one_sigma = 0;
  for (int k = 0; k < count; ++k) {
    const double z = normal();
    sum += z;
    sum_squares += z * z;
    lag_product += z * previous;  // Box-Muller pairs: consecutive draws must be uncorrelated too
    previous = z;
    within_one_sigma += std::abs(z) < 1 ? 1 : 0;
  }
  // Standard errors for N = 40000: mean 1/sqrt(N) = 0.005, variance sqrt(2/N) = 0.0071, lag-1 correlation
  // 0.005, P(|z| < 1) = 0.6827 with sqrt(p(1-p)/N) = 0.0023. Every bound below is about five standard errors.
  REQUIRE(std::abs(sum / count) < 0.025);
  REQUIRE(std::abs(sum_squares / count - 1) < 0.035);
  REQUIRE(std::abs(lag_product / count) < 0.025);
  REQUIRE(std::abs(static_cast<double>(within_one_sigma) / count - 0.682689) < 0.012);
}

TEST_CASE("init_fan_in scales by 1/sqrt(fan-in) and zeroes the gradient", "[parameter]") {
  Parameter<double> w("w", 400, 50);
  w.grad.setOnes();
  polyattn::init_fan_in(w, 3, 2.0);
  REQUIRE(w.grad.isZero(0));
  // 20000 samples of N(0, 4/400): sample variance within 5 * sqrt(2/20000) = 5% of 0.01.
  const double variance = w.value.squaredNorm() / static_cast<double>(w.size());
  REQUIRE(variance == Approx(4.0 / 400).epsilon(0.05));

  Parameter<double> v("v", 400, 50);
  polyattn::init_normal(v, 0.1, 3);
  REQUIRE(w.value == 2.0 / 0.1 / std::sqrt(400.0) * v.value);

  polyattn::init_constant(v, 1.5);
  REQUIRE((v.value.array() == 1.5).all());
  Parameter<double> empty("empty", 0, 4);
  REQUIRE_THROWS_WITH(polyattn::init_fan_in(empty, 1), Contains("init_fan_in") && Contains("'empty'"));
}

TEST_CASE("derive_seed gives distinct reproducible streams", "[parameter]") {
  std::vector<std::uint64_t> seeds;
  for (std::uint64_t stream = 0; stream < 64; ++stream) seeds.push_back(polyattn::derive_seed(42, stream));
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    REQUIRE(seeds[i] == polyattn::derive_seed(42, i));
    REQUIRE(seeds[i] != polyattn::derive_seed(43, i));
    for (std::size_t j = 0; j < i; ++j) REQUIRE(seeds[i] != seeds[j]);
  }
}
