/// ile polyattn.hpp
/// Umbrella header: includes every public polyattn header, in data-flow order
/// (polynomial -> feature map -> attention -> gradients -> layers -> model).
#pragma once

#include "common.hpp"
#include "attention/polynomial.hpp"
#include "attention/feature_map.hpp"
#include "attention/options.hpp"
#include "attention/exact_attention.hpp"
#include "attention/polynomial_attention.hpp"
#include "attention/backend.hpp"
#include "attention/causal_scan.hpp"
#include "attention/exact_gradients.hpp"
#include "attention/paper_gradients.hpp"
#include "attention/adjoint_gradients.hpp"
#include "attention/backend_factory.hpp"
#include "nn/attention_layers.hpp"
#include "nn/parameter.hpp"
#include "nn/linear.hpp"
#include "nn/lora.hpp"
#include "nn/layer_norm.hpp"
#include "nn/activation.hpp"
#include "nn/mlp.hpp"
#include "nn/embedding.hpp"
#include "nn/cross_entropy.hpp"
#include "nn/self_attention.hpp"
#include "nn/optimizer.hpp"
#include "nn/composition.hpp"
#include "nn/gpt.hpp"
#include "nn/serialization.hpp"
