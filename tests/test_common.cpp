#include <polyattn/common.hpp>

#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>

using polyattn::Matrix;
using polyattn::detail::require_finite;
using polyattn::detail::require_positive;
using polyattn::detail::require_shape;
using Catch::Contains;

TEST_CASE("require_shape names the argument and both shapes", "[common]") {
  const Matrix<double> q = Matrix<double>::Zero(3, 4);
  REQUIRE_NOTHROW(require_shape("attention", "Q", q, 3, 4));
  REQUIRE_THROWS_AS(require_shape("attention", "Q", q, 3, 5), std::invalid_argument);
  REQUIRE_THROWS_WITH(require_shape("attention", "Q", q, 3, 5),
                      Contains("attention") && Contains("'Q'") && Contains("3x5") &&
                          Contains("3x4"));
}

TEST_CASE("require_finite names the argument and the offending entry", "[common]") {
  Matrix<float> k = Matrix<float>::Ones(2, 3);
  REQUIRE_NOTHROW(require_finite("attention", "K", k));
  k(1, 2) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(require_finite("attention", "K", k), std::invalid_argument);
  REQUIRE_THROWS_WITH(require_finite("attention", "K", k),
                      Contains("'K'") && Contains("(1, 2)"));
  k(1, 2) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(require_finite("attention", "K", k), Contains("'K'"));
}

TEST_CASE("require_positive rejects zero, negative and non-finite values", "[common]") {
  REQUIRE_NOTHROW(require_positive("attention", "scale", 0.5));
  for (const double bad : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                           std::numeric_limits<double>::infinity()}) {
    REQUIRE_THROWS_AS(require_positive("attention", "scale", bad), std::invalid_argument);
    REQUIRE_THROWS_WITH(require_positive("attention", "scale", bad), Contains("'scale'"));
  }
}
