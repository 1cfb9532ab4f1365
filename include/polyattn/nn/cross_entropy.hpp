/// \file nn/cross_entropy.hpp
/// Mean softmax cross-entropy of next-token logits, forward and backward.
#pragma once

#include "../common.hpp"
#include "../parallel/threads.hpp"

#include <algorithm>
#include <optional>
#include <vector>

namespace polyattn {

/// Options of CrossEntropy.
struct CrossEntropyOptions {
  /// Rows whose target equals this id are not scored (padding, or positions without a next token). Empty
  /// (default): every row is scored and every target must be a valid id. When set it must lie outside
  /// \f$[0, V)\f$, so it can never hide a real token.
  std::optional<Index> ignore_target;

  /// Throws std::invalid_argument if `ignore_target` is a valid token id for a vocabulary of `vocab_size`.
  void check(Index vocab_size) const {
    if (ignore_target)
      detail::require(*ignore_target < 0 || *ignore_target >= vocab_size, "polyattn::CrossEntropyOptions",
                      "'ignore_target' must lie outside [0, ", vocab_size, ") (it would hide a real token), got ",
                      *ignore_target);
  }
};

/// Mean cross-entropy of the softmax of each logits row against its integer target:
/// \f[ L = \frac1{|S|}\sum_{i\in S}\Big(\log\sum_v e^{z_{iv}} - z_{i t_i}\Big)
///       = \frac1{|S|}\sum_{i\in S}\Big((m_i - z_{i t_i}) + \log\sum_v e^{z_{iv}-m_i}\Big),\qquad
///     m_i = \max_v z_{iv}, \f]
/// over the scored rows \f$S\f$ (all rows unless an ignore target is set). Subtracting \f$m_i\f$ makes every
/// exponent \f$\le 0\f$ and the sum \f$\ge 1\f$, so nothing overflows and the logarithm is well conditioned for any
/// finite logits; \f$m_i - z_{it_i} \ge 0\f$ is formed before adding the logarithm, which huge logits would
/// otherwise absorb. The caller aligns the targets: for next-token prediction \f$t_i\f$ is the token at position
/// \f$i+1\f$. With \f$P\f$ = softmax rows (saved by forward), backward accumulates
/// \f[ \partial L/\partial z_{i\cdot} \mathrel{+}= \tfrac1{|S|}\,(P_{i\cdot} - e_{t_i}^\top)\quad (i \in S). \f]
/// Forward also counts the scored rows whose target attains the row maximum (ties count as correct).
///
/// **A mean over several shards.** When the rows of one mean are split over ranks (GPT::set_state_exchange()),
/// each rank takes loss_sum() and scored() of its rows, the ranks add them, and backward(logits, targets,
/// dlogits, scored_total) differentiates \f$L = \frac1{|S_{\text{total}}|}\sum_{i\in S}\ell_i\f$ with the
/// global count, so that the shards' gradients are exactly the rows of the unsplit mean's gradient.
///
/// Both passes run on num_threads() threads over blocks of block_rows rows (parallel/threads.hpp); forward sums
/// the loss, scored and correct rows per block and adds the blocks' sums in block order, so results are the same
/// for any number of threads.
///
/// \code
///   polyattn::CrossEntropy<float> loss;
///   const double value = loss.forward(logits, targets);       // logits n x V, targets[i] = tokens[i + 1]
///   polyattn::Matrix<float> dlogits = polyattn::Matrix<float>::Zero(n, V);
///   loss.backward(logits, targets, dlogits);
///   double acc = loss.accuracy();
/// \endcode
template <class T>
class CrossEntropy {
 public:
  explicit CrossEntropy(CrossEntropyOptions options = {}) : options_(options) { detail::static_check_scalar<T>(); }

  const CrossEntropyOptions& options() const { return options_; }

  /// Returns the mean loss over the scored rows (0 when no row is scored) for `logits` (n x V) and the n
  /// `targets`; saves the probabilities for backward.
  double forward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets);

  /// Accumulates \f$\partial L/\partial z\f$ into `dlogits` (n x V), for the logits and targets of the
  /// preceding forward().
  void backward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets, MatrixRef<T> dlogits);

  /// As backward() above, but for the mean over `scored_total` scored rows of which this forward() saw scored()
  /// (the others are on other ranks): accumulates \f$\tfrac1{\text{scored\_total}}(P_{i\cdot} - e_{t_i}^\top)\f$
  /// for the scored rows. Throws std::invalid_argument unless `scored_total` >= scored().
  void backward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets, MatrixRef<T> dlogits,
                Index scored_total);

  /// Rows per parallel block: a row costs V exponentials, so 256 rows are ample work per block even for a byte
  /// vocabulary (64K exponentials at V = 256) and leave n / 256 blocks for load balance. Fixed, so results
  /// never depend on the thread count.
  static constexpr Index block_rows = 256;

  /// Softmax of each logits row of the last forward call (n x V).
  const Matrix<T>& probabilities() const { return probabilities_; }
  /// Number of rows the last forward call scored.
  Index scored() const { return scored_; }
  /// Sum of the losses of the rows the last forward call scored (the mean times scored()), added in block order.
  double loss_sum() const { return loss_sum_; }
  /// Number of scored rows whose target attained the row maximum.
  Index correct() const { return correct_; }
  /// correct() / scored() (0 when nothing was scored).
  double accuracy() const {
    return scored_ > 0 ? static_cast<double>(correct_) / static_cast<double>(scored_) : 0.0;
  }

 private:
  bool is_ignored(Index target) const { return options_.ignore_target && target == *options_.ignore_target; }

  void check_input(const char* where, const ConstMatrixRef<T>& logits, const std::vector<Index>& targets) const {
    detail::require_nonempty(where, "logits", logits);
    options_.check(logits.cols());
    detail::require(static_cast<Index>(targets.size()) == logits.rows(), where,
                    "argument 'targets' must have one entry per logits row (", logits.rows(), "), got ",
                    targets.size());
    for (std::size_t i = 0; i < targets.size(); ++i)
      detail::require(is_ignored(targets[i]) || (targets[i] >= 0 && targets[i] < logits.cols()), where,
                      "argument 'targets' entry ", i, " must be in [0, ", logits.cols(), ")",
                      options_.ignore_target ? " or the ignore target" : "", ", got ", targets[i]);
  }

  CrossEntropyOptions options_;
  Matrix<T> probabilities_;
  Vector<T> row_max_, row_sum_, row_weight_;
  // Per-block sums of forward(), added in block order.
  struct BlockSums {
    double loss = 0;
    Index scored = 0, correct = 0;
  };
  std::vector<BlockSums> block_sums_;
  std::vector<Index> targets_;
  Index scored_ = 0;
  Index correct_ = 0;
  double loss_sum_ = 0;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
double CrossEntropy<T>::forward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets) {
  constexpr const char* where = "polyattn::CrossEntropy::forward";
  check_input(where, logits, targets);
  detail::require_finite_in_parallel(where, "logits", logits);
  const Index n = logits.rows(), blocks = detail::block_count(n, block_rows);
  row_max_.resize(n);
  row_sum_.resize(n);
  probabilities_.resize(n, logits.cols());
  block_sums_.resize(static_cast<std::size_t>(blocks));
  detail::parallel_for(blocks, [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    auto row_max = row_max_.segment(begin, count);
    auto row_sum = row_sum_.segment(begin, count);
    auto probabilities = probabilities_.middleRows(begin, count);
    row_max = logits.middleRows(begin, count).rowwise().maxCoeff();
    probabilities = (logits.middleRows(begin, count).colwise() - row_max).array().exp();
    row_sum = probabilities.rowwise().sum();
    probabilities.array().colwise() /= row_sum.array();
    BlockSums sums;
    for (Index i = begin; i < begin + count; ++i) {
      const Index target = targets[static_cast<std::size_t>(i)];
      if (is_ignored(target)) continue;
      ++sums.scored;
      const T target_logit = logits(i, target);
      if (target_logit == row_max_(i)) ++sums.correct;
      // (m - z_t) first: with huge logits m + log s would absorb log s before z_t cancels m.
      sums.loss += (static_cast<double>(row_max_(i)) - static_cast<double>(target_logit)) +
                   std::log(static_cast<double>(row_sum_(i)));
    }
    block_sums_[static_cast<std::size_t>(block)] = sums;
  });
  targets_ = targets;
  scored_ = 0;
  correct_ = 0;
  double total = 0;
  for (const BlockSums& sums : block_sums_) {  // in block order
    scored_ += sums.scored;
    correct_ += sums.correct;
    total += sums.loss;
  }
  loss_sum_ = total;
  return scored_ > 0 ? total / static_cast<double>(scored_) : 0.0;
}

template <class T>
void CrossEntropy<T>::backward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets,
                               MatrixRef<T> dlogits) {
  backward(logits, targets, dlogits, scored_);
}

template <class T>
void CrossEntropy<T>::backward(const ConstMatrixRef<T>& logits, const std::vector<Index>& targets,
                               MatrixRef<T> dlogits, Index scored_total) {
  constexpr const char* where = "polyattn::CrossEntropy::backward";
  check_input(where, logits, targets);
  detail::require(scored_total >= scored_, where,
                  "argument 'scored_total' must be at least the rows the forward pass scored (", scored_, "), got ",
                  scored_total);
  detail::require_shape(where, "dlogits", dlogits, logits.rows(), logits.cols());
  detail::require(probabilities_.rows() == logits.rows() && probabilities_.cols() == logits.cols() &&
                      targets_ == targets,
                  where, "needs the forward pass of the same 'logits' and 'targets' first (saved state is ",
                  probabilities_.rows(), "x", probabilities_.cols(), " with ", targets_.size(), " targets)");
  if (scored_ == 0) return;
  const T weight = static_cast<T>(1.0 / static_cast<double>(scored_total));
  const Index n = logits.rows();
  const bool all_scored = scored_ == n;
  if (!all_scored) row_weight_.resize(n);
  detail::parallel_for(detail::block_count(n, block_rows), [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    auto G = dlogits.middleRows(begin, count);
    if (all_scored) {
      G.noalias() += weight * probabilities_.middleRows(begin, count);
    } else {
      auto row_weight = row_weight_.segment(begin, count);
      for (Index i = 0; i < count; ++i)
        row_weight(i) = is_ignored(targets[static_cast<std::size_t>(begin + i)]) ? T(0) : weight;
      G.noalias() += row_weight.asDiagonal() * probabilities_.middleRows(begin, count);
    }
    for (Index i = begin; i < begin + count; ++i) {
      const Index target = targets[static_cast<std::size_t>(i)];
      if (!is_ignored(target)) dlogits(i, target) -= weight;
    }
  });
}

}  // namespace polyattn
