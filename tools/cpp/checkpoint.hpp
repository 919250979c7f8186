// Reads the folder written by tools/convert_ckpt.py and runs its language model in fp32.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> data;  // C order
};

struct Checkpoint {
    std::string dir;
    std::map<std::string, Tensor> tensors;

    uint64_t total_bytes() const;
    // Throws, naming the tensor, when it is absent.
    const Tensor& at(const std::string& name) const;
};

// Reads DIR/metadata.json and every tensor it lists; throws std::runtime_error on any mismatch.
Checkpoint load(const std::string& dir);

struct LanguageConfig {
    int64_t hidden_size, num_layers, num_heads, ffn_size, vocab_size;
    double norm_eps, rope_theta;
};

// The "language" object of DIR/config.json.
LanguageConfig load_language_config(const std::string& dir);

class LanguageModel {
public:
    // Reads config.json from the checkpoint's folder and checks every language tensor's shape against it.
    explicit LanguageModel(Checkpoint checkpoint);
    // Layer weights point into checkpoint_; a copy would point into the original.
    LanguageModel(const LanguageModel&) = delete;
    LanguageModel& operator=(const LanguageModel&) = delete;

    const LanguageConfig& config() const { return cfg_; }
    // [tokens.size() * vocab_size], position-major.
    std::vector<float> logits(const std::vector<int>& tokens) const;
    // n_new argmax continuations (the lowest id on ties).
    std::vector<int> greedy(const std::vector<int>& tokens, int n_new) const;

private:
    struct Layer {
        const float *attn_norm, *q, *k, *v, *out, *mlp_norm, *gate, *up, *down;
    };
    // Keys and values of the positions seen so far, per layer, [positions * hidden_size].
    struct Cache {
        std::vector<std::vector<float>> k, v;
    };

    Checkpoint checkpoint_;
    LanguageConfig cfg_;
    const float* embedding_;
    std::vector<Layer> layers_;
    const float* norm_;
    const float* head_;

    // Runs tokens at the positions following those in cache, appending to it; returns the logits
    // of every new position, or only of the last one.
    std::vector<float> forward(const std::vector<int>& tokens, Cache& cache, bool all_positions) const;
};
