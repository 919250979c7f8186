#include "checkpoint.hpp"

#include "json.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot open " + path.string() + ": " + std::strerror(errno));
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) fail("cannot read " + path.string());
    return text.str();
}

json::Value read_json(const fs::path& path) {
    const std::string text = read_text(path);
    try {
        return json::parse(text);
    } catch (const std::runtime_error& e) {
        fail(path.string() + ": " + e.what());
    }
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// JSON numbers are doubles: an integer field must be integral and exactly representable.
bool as_count(const json::Value& v, int64_t& out) {
    if (!v.is_number() || v.number < 0 || v.number > 9007199254740992.0 || v.number != std::floor(v.number))
        return false;
    out = static_cast<int64_t>(v.number);
    return true;
}

std::string describe(const json::Value& v) {
    if (v.is_number()) {
        std::ostringstream s;
        s.precision(17);
        s << v.number;
        return s.str();
    }
    if (v.is_string()) return "\"" + v.string + "\"";
    return json::type_name(v.type);
}

bool little_endian_host() {
    const uint32_t one = 1;
    unsigned char first;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

void swap_bytes(std::vector<float>& data) {
    for (float& f : data) {
        unsigned char b[4];
        std::memcpy(b, &f, 4);
        std::swap(b[0], b[3]);
        std::swap(b[1], b[2]);
        std::memcpy(&f, b, 4);
    }
}

Tensor read_tensor(const std::string& name, const json::Value& entry, const fs::path& dir) {
    const std::string where = "metadata.json: tensor \"" + name + "\"";
    if (!entry.is_object()) fail(where + " must be an object, got " + describe(entry));
    const json::Value* path = entry.find("path");
    const json::Value* shape = entry.find("shape");
    const json::Value* dtype = entry.find("dtype");
    if (!path || !path->is_string()) fail(where + ": \"path\" must be a string");
    if (!shape || !shape->is_array()) fail(where + ": \"shape\" must be an array");
    if (!dtype || !dtype->is_string()) fail(where + ": \"dtype\" must be a string");
    if (dtype->string != "float32")
        fail(where + ": dtype is \"" + dtype->string + "\", expected \"float32\"");

    Tensor t;
    uint64_t count = 1;
    for (const json::Value& d : shape->array) {
        int64_t n;
        if (!as_count(d, n)) fail(where + ": shape entries must be non-negative integers, got " + describe(d));
        if (n > 0 && count > std::numeric_limits<uint64_t>::max() / 4 / static_cast<uint64_t>(n))
            fail(where + ": shape " + shape_str(t.shape) + "... is too large");
        count *= static_cast<uint64_t>(n);
        t.shape.push_back(n);
    }

    const fs::path file = fs::path(path->string).is_absolute() ? fs::path(path->string) : dir / path->string;
    std::error_code ec;
    const uint64_t size = fs::file_size(file, ec);
    if (ec) fail("tensor \"" + name + "\": cannot read " + file.string() + ": " + ec.message());
    if (size != count * 4)
        fail("tensor \"" + name + "\": " + file.string() + " has " + std::to_string(size) + " bytes, expected " +
             std::to_string(count * 4) + " (shape " + shape_str(t.shape) + " x 4 bytes of float32)");

    t.data.resize(count);
    std::ifstream in(file, std::ios::binary);
    in.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(size));
    if (!in || static_cast<uint64_t>(in.gcount()) != size)
        fail("tensor \"" + name + "\": cannot read " + std::to_string(size) + " bytes from " + file.string());
    if (!little_endian_host()) swap_bytes(t.data);
    return t;
}

int64_t config_count(const json::Value& language, const char* key) {
    const json::Value* v = language.find(key);
    if (!v) fail(std::string("config.json: language.") + key + " is missing");
    int64_t n;
    if (!as_count(*v, n) || n == 0)
        fail(std::string("config.json: language.") + key + " must be a positive integer, got " + describe(*v));
    return n;
}

double config_number(const json::Value& language, const char* key) {
    const json::Value* v = language.find(key);
    if (!v) fail(std::string("config.json: language.") + key + " is missing");
    if (!v->is_number() || !(v->number > 0) || !std::isfinite(v->number))
        fail(std::string("config.json: language.") + key + " must be a positive number, got " + describe(*v));
    return v->number;
}

double dot(const float* a, const float* b, int64_t n) {
    // Double sums keep rounding far below float32's; four independent chains run faster than one.
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += double(a[i]) * b[i];
        s1 += double(a[i + 1]) * b[i + 1];
        s2 += double(a[i + 2]) * b[i + 2];
        s3 += double(a[i + 3]) * b[i + 3];
    }
    for (; i < n; ++i) s0 += double(a[i]) * b[i];
    return (s0 + s1) + (s2 + s3);
}

// y[rows, out] = x[rows, in] W^T with W [out, in]; each weight row is used for every position while cached.
std::vector<float> linear(const std::vector<float>& x, int64_t in, const float* w, int64_t out) {
    const int64_t rows = static_cast<int64_t>(x.size()) / in;
    std::vector<float> y(rows * out);
    for (int64_t o = 0; o < out; ++o)
        for (int64_t r = 0; r < rows; ++r) y[r * out + o] = static_cast<float>(dot(&x[r * in], w + o * in, in));
    return y;
}

std::vector<float> rms_norm(const std::vector<float>& x, int64_t dim, const float* w, double eps) {
    std::vector<float> y(x.size());
    for (size_t r = 0; r < x.size() / dim; ++r) {
        const float* row = &x[r * dim];
        const double scale = 1.0 / std::sqrt(dot(row, row, dim) / dim + eps);
        for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = static_cast<float>(row[i] * scale * w[i]);
    }
    return y;
}

void add(std::vector<float>& x, const std::vector<float>& y) {
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
}

}  // namespace

uint64_t Checkpoint::total_bytes() const {
    uint64_t total = 0;
    for (const auto& entry : tensors) total += entry.second.data.size() * 4;
    return total;
}

const Tensor& Checkpoint::at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("tensor \"" + name + "\" is missing from " + dir + "/metadata.json");
    return it->second;
}

Checkpoint load(const std::string& dir) {
    const json::Value metadata = read_json(fs::path(dir) / "metadata.json");
    if (!metadata.is_object()) fail("metadata.json must hold an object, got " + describe(metadata));
    Checkpoint ckpt;
    ckpt.dir = dir;
    for (const auto& entry : metadata.object) ckpt.tensors[entry.first] = read_tensor(entry.first, entry.second, dir);
    return ckpt;
}

LanguageConfig load_language_config(const std::string& dir) {
    const json::Value config = read_json(fs::path(dir) / "config.json");
    const json::Value* language = config.find("language");
    if (!language || !language->is_object()) fail("config.json: \"language\" must be an object");
    LanguageConfig c;
    c.hidden_size = config_count(*language, "hidden_size");
    c.num_layers = config_count(*language, "num_layers");
    c.num_heads = config_count(*language, "num_heads");
    c.ffn_size = config_count(*language, "ffn_size");
    c.vocab_size = config_count(*language, "vocab_size");
    c.norm_eps = config_number(*language, "norm_eps");
    c.rope_theta = config_number(*language, "rope_theta");
    if (c.hidden_size % c.num_heads || (c.hidden_size / c.num_heads) % 2)
        fail("config.json: language.hidden_size " + std::to_string(c.hidden_size) + " must split into " +
             std::to_string(c.num_heads) + " heads of an even size (rotary embedding pairs)");
    if (c.vocab_size > std::numeric_limits<int>::max())
        fail("config.json: language.vocab_size " + std::to_string(c.vocab_size) + " does not fit token ids");
    return c;
}

LanguageModel::LanguageModel(Checkpoint checkpoint)
    : checkpoint_(std::move(checkpoint)), cfg_(load_language_config(checkpoint_.dir)) {
    const int64_t h = cfg_.hidden_size, f = cfg_.ffn_size, v = cfg_.vocab_size;
    auto weight = [&](const std::string& name, std::vector<int64_t> shape) {
        const Tensor& t = checkpoint_.at(name);
        if (t.shape != shape)
            fail("tensor \"" + name + "\" has shape " + shape_str(t.shape) + ", expected " + shape_str(shape) +
                 " from config.json");
        return t.data.data();
    };
    embedding_ = weight("language_encoder.embedding.weight", {v, h});
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
        const std::string p = "language_encoder.layers." + std::to_string(i) + ".";
        layers_.push_back({weight(p + "attn_norm.weight", {h}), weight(p + "attn.q.weight", {h, h}),
                           weight(p + "attn.k.weight", {h, h}), weight(p + "attn.v.weight", {h, h}),
                           weight(p + "attn.out.weight", {h, h}), weight(p + "mlp_norm.weight", {h}),
                           weight(p + "mlp.gate.weight", {f, h}), weight(p + "mlp.up.weight", {f, h}),
                           weight(p + "mlp.down.weight", {h, f})});
    }
    norm_ = weight("language_encoder.norm.weight", {h});
    head_ = weight("autoregressive_head.weight", {v, h});
}

std::vector<float> LanguageModel::forward(const std::vector<int>& tokens, Cache& cache, bool all_positions) const {
    const int64_t h = cfg_.hidden_size, heads = cfg_.num_heads, hd = h / heads, half = hd / 2;
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (cache.k.empty()) {
        cache.k.resize(cfg_.num_layers);
        cache.v.resize(cfg_.num_layers);
    }
    const int64_t past = static_cast<int64_t>(cache.k[0].size()) / h;

    std::vector<float> x(n * h);
    for (int64_t r = 0; r < n; ++r) {
        if (tokens[r] < 0 || tokens[r] >= cfg_.vocab_size)
            fail("token id " + std::to_string(tokens[r]) + " is out of range (vocab_size " +
                 std::to_string(cfg_.vocab_size) + ")");
        std::copy_n(embedding_ + tokens[r] * h, h, &x[r * h]);
    }

    // Angles are rounded to float32 like model/gpt.py's rope_tables, which matters at long positions.
    std::vector<double> cosines(n * half), sines(n * half);
    for (int64_t j = 0; j < half; ++j) {
        const float inv_freq = 1.0f / std::pow(static_cast<float>(cfg_.rope_theta), float(2 * j) / float(hd));
        for (int64_t r = 0; r < n; ++r) {
            const float angle = static_cast<float>(past + r) * inv_freq;
            cosines[r * half + j] = std::cos(angle);
            sines[r * half + j] = std::sin(angle);
        }
    }
    auto rope = [&](std::vector<float>& t) {
        for (int64_t r = 0; r < n; ++r)
            for (int64_t head = 0; head < heads; ++head) {
                float* p = &t[r * h + head * hd];
                for (int64_t j = 0; j < half; ++j) {
                    const double c = cosines[r * half + j], s = sines[r * half + j], x1 = p[j], x2 = p[j + half];
                    p[j] = static_cast<float>(x1 * c - x2 * s);
                    p[j + half] = static_cast<float>(x2 * c + x1 * s);
                }
            }
    };

    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    std::vector<double> scores(past + n), acc(hd);
    for (int64_t l = 0; l < cfg_.num_layers; ++l) {
        const Layer& w = layers_[l];
        std::vector<float> a = rms_norm(x, h, w.attn_norm, cfg_.norm_eps);
        std::vector<float> q = linear(a, h, w.q, h), k = linear(a, h, w.k, h), v = linear(a, h, w.v, h);
        rope(q);
        rope(k);
        std::vector<float>& keys = cache.k[l];
        std::vector<float>& values = cache.v[l];
        keys.insert(keys.end(), k.begin(), k.end());
        values.insert(values.end(), v.begin(), v.end());

        for (int64_t r = 0; r < n; ++r) {
            const int64_t visible = past + r + 1;  // causal: itself and every earlier position
            for (int64_t head = 0; head < heads; ++head) {
                const float* qr = &q[r * h + head * hd];
                double top = -std::numeric_limits<double>::infinity();
                for (int64_t t = 0; t < visible; ++t) {
                    scores[t] = dot(qr, &keys[t * h + head * hd], hd) * scale;
                    top = std::max(top, scores[t]);
                }
                double total = 0;
                std::fill(acc.begin(), acc.end(), 0.0);
                for (int64_t t = 0; t < visible; ++t) {
                    const double p = std::exp(scores[t] - top);
                    total += p;
                    const float* vt = &values[t * h + head * hd];
                    for (int64_t d = 0; d < hd; ++d) acc[d] += p * vt[d];
                }
                for (int64_t d = 0; d < hd; ++d) a[r * h + head * hd + d] = static_cast<float>(acc[d] / total);
            }
        }
        add(x, linear(a, h, w.out, h));

        a = rms_norm(x, h, w.mlp_norm, cfg_.norm_eps);
        std::vector<float> gate = linear(a, h, w.gate, cfg_.ffn_size), up = linear(a, h, w.up, cfg_.ffn_size);
        for (size_t i = 0; i < gate.size(); ++i) {
            const double z = gate[i];
            gate[i] = static_cast<float>(z / (1.0 + std::exp(-z)) * up[i]);
        }
        add(x, linear(gate, cfg_.ffn_size, w.down, h));
    }

    if (!all_positions) x.erase(x.begin(), x.end() - h);
    return linear(rms_norm(x, h, norm_, cfg_.norm_eps), h, head_, cfg_.vocab_size);
}

std::vector<float> LanguageModel::logits(const std::vector<int>& tokens) const {
    Cache cache;
    return forward(tokens, cache, true);
}

std::vector<int> LanguageModel::greedy(const std::vector<int>& tokens, int n_new) const {
    if (tokens.empty()) fail("greedy generation needs at least one prompt token");
    // Every position's values are computed the same way with or without the cache, so this equals
    // re-running the extended sequence.
    Cache cache;
    std::vector<float> last = forward(tokens, cache, false);
    std::vector<int> generated;
    for (int i = 0; i < n_new; ++i) {
        const int next = static_cast<int>(std::max_element(last.begin(), last.end()) - last.begin());
        generated.push_back(next);
        if (i + 1 < n_new) last = forward({next}, cache, false);
    }
    return generated;
}
