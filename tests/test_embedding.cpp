#include <polyattn/nn/embedding.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::Embedding;
using polyattn::EmbeddingOptions;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

template <class T>
Embedding<T> unit_embedding(Index vocab, Index positions, Index d) {
  return Embedding<T>({vocab, positions, d, 1.0, 1.0, 61});
}

double embedding_projected_loss(const Embedding<double>& embed, const std::vector<Index>& tokens,
                                 const Matrix<double>& R) {
  Matrix<double> Y(static_cast<Index>(tokens.size()), embed.d_model());
  embed.forward(tokens, Y);
  return (R.array() * Y.array()).sum();
}

}  // namespace

TEST_CASE("Embedding forward adds the token row and the position row", "[embedding]") {
  const Embedding<double> embed = unit_embedding<double>(10, 8, 4);
  const std::vector<Index> tokens{3, 9, 0, 3, 7};
  Matrix<double> Y(5, 4);
  embed.forward(tokens, Y);
  for (Index i = 0; i < 5; ++i)
    REQUIRE(Y.row(i) == embed.token_table.value.row(tokens[static_cast<std::size_t>(i)]) +
                            embed.position_table.value.row(i));
}

TEST_CASE("Embedding backward scatters into the tables and matches finite differences", "[embedding]") {
  Embedding<double> embed = unit_embedding<double>(6, 7, 3);
  const std::vector<Index> tokens{2, 5, 2, 0, 2};  // token 2 three times: its gradient rows must add up
  const Matrix<double> R = random_matrix<double>(5, 3, 1);
  embed.backward(tokens, R);
  const auto loss = [&] { return embedding_projected_loss(embed, tokens, R); };
  // The loss is linear in both tables: central differences are exact up to rounding, ~1e-9 relative.
  REQUIRE(gradient_error(loss, embed.token_table.value, embed.token_table.grad) < 1e-7);
  REQUIRE(gradient_error(loss, embed.position_table.value, embed.position_table.grad) < 1e-7);
  REQUIRE(relative_error(embed.token_table.grad.row(2), R.row(0) + R.row(2) + R.row(4)) < 1e-15);
  REQUIRE(embed.token_table.grad.row(1).isZero(0));  // unused tokens and positions get nothing
  REQUIRE(embed.position_table.grad.bottomRows(2).isZero(0));

  const Matrix<double> token_grad = embed.token_table.grad;
  embed.backward(tokens, R);
  REQUIRE(relative_error(embed.token_table.grad, 2 * token_grad) < 1e-15);
}

TEST_CASE("Embedding frozen tables receive no gradient", "[embedding]") {
  Embedding<double> embed = unit_embedding<double>(6, 4, 3);
  embed.token_table.trainable = false;
  embed.backward({1, 2}, Matrix<double>::Ones(2, 3));
  REQUIRE(embed.token_table.grad.isZero(0));
  REQUIRE(embed.position_table.grad.topRows(2) == Matrix<double>::Ones(2, 3));
}

TEST_CASE("Embedding in float agrees with double", "[embedding]") {
  const Embedding<double> reference = unit_embedding<double>(50, 32, 16);
  Embedding<float> single = unit_embedding<float>(50, 32, 16);
  std::vector<Index> tokens;
  for (Index i = 0; i < 32; ++i) tokens.push_back((7 * i + 3) % 11);  // each id 2 or 3 times
  Matrix<double> Y(32, 16);
  Matrix<float> Yf(32, 16);
  reference.forward(tokens, Y);
  single.forward(tokens, Yf);
  // The float tables are the rounded double tables (same seed), and each entry adds two of them: error at most
  // 3 u (|a| + |b|) per entry, and |a| + |b| <= sqrt(2) |(a, b)| on average for independent normals, so the
  // relative Frobenius error stays well below 6 u = 3.6e-7, the tolerance.
  REQUIRE(relative_error(Yf, Y) < 3.6e-7);
  const Matrix<double> dY = random_matrix<double>(32, 16, 2);
  single.backward(tokens, dY.cast<float>());
  Embedding<double> reference_grad = unit_embedding<double>(50, 32, 16);
  reference_grad.backward(tokens, dY);
  // Each token row sums at most 3 rounded rows of dY (two additions): at most 3 u per entry, below 6 u = 3.6e-7.
  REQUIRE(relative_error(single.token_table.grad, reference_grad.token_table.grad) < 3.6e-7);
  REQUIRE(relative_error(single.position_table.grad, reference_grad.position_table.grad) < 3.6e-7);
}

TEST_CASE("Embedding initialisation, names and validation", "[embedding]") {
  const Embedding<double> a({100, 16, 8}), b({100, 16, 8}), c({100, 16, 8, 0.02, 0.01, 1});
  REQUIRE(a.token_table.value == b.token_table.value);
  REQUIRE(a.token_table.value != c.token_table.value);
  REQUIRE(a.token_table.name == "wte");
  REQUIRE(a.position_table.name == "wpe");
  REQUIRE(Embedding<double>({4, 4, 2}, "enc.").token_table.name == "enc.wte");
  // 800 N(0, 0.02^2) samples: the sample standard deviation is within 5 * 2.5% of 0.02.
  REQUIRE(a.token_table.value.norm() / std::sqrt(800.0) == Approx(0.02).epsilon(0.125));

  REQUIRE_THROWS_WITH((Embedding<double>({0, 4, 2})), Contains("EmbeddingOptions") && Contains("'vocab_size'"));
  REQUIRE_THROWS_WITH((Embedding<double>({4, 0, 2})), Contains("'max_positions'"));
  REQUIRE_THROWS_WITH((Embedding<double>({4, 4, 0})), Contains("'d_model'"));
  REQUIRE_THROWS_WITH((Embedding<double>({4, 4, 2, -1.0})), Contains("'token_init_std'"));

  Embedding<double> embed({10, 4, 3});
  Matrix<double> Y(3, 3);
  REQUIRE_THROWS_AS(embed.forward({1, 2, 10}, Y), std::invalid_argument);
  REQUIRE_THROWS_WITH(embed.forward({1, 2, 10}, Y), Contains("Embedding::forward") && Contains("'tokens'") &&
                                                        Contains("entry 2") && Contains("[0, 10)") &&
                                                        Contains("got 10"));
  REQUIRE_THROWS_WITH(embed.forward({1, -1, 2}, Y), Contains("entry 1") && Contains("got -1"));
  REQUIRE_THROWS_WITH(embed.backward({1, -1, 2}, Y), Contains("Embedding::backward") && Contains("got -1"));
  Matrix<double> long_output(5, 3);
  REQUIRE_THROWS_WITH(embed.forward({1, 1, 1, 1, 1}, long_output),
                      Contains("'tokens'") && Contains("between 1 and 4") && Contains("got 5"));
  REQUIRE_THROWS_WITH(embed.forward({}, Y.topRows(0)), Contains("got 0"));
  REQUIRE_THROWS_WITH(embed.forward({1, 2}, Y), Contains("'Y'") && Contains("2x3") && Contains("3x3"));
  Matrix<double> dY = Matrix<double>::Ones(3, 3);
  dY(2, 1) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(embed.backward({1, 2, 3}, dY), Contains("'dY'") && Contains("(2, 1)"));
}
