// cromwell_infer DIR --tokens 1,2,3 [--generate N] [--logits-out FILE]
// Runs the language model of a tools/convert_ckpt.py export on the CPU in fp32.
#include "checkpoint.hpp"

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const char* usage =
    "usage: cromwell_infer DIR --tokens ID,ID,... [--generate N] [--logits-out FILE]\n"
    "\n"
    "Loads the export in DIR (metadata.json, config.json, one .bin per tensor) and prints\n"
    "  tensors COUNT BYTES          what was loaded\n"
    "  next_token_logits L0 L1 ...  the last position's logits\n"
    "  greedy ID ...                with --generate N: N greedily generated token ids\n"
    "--logits-out FILE writes every position's logits [S, V] as raw little-endian float32.\n";

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

int parse_int(const std::string& text, const std::string& what) {
    if (text.empty() || text.size() > 10 || text.find_first_not_of("0123456789") != std::string::npos)
        fail("invalid " + what + " '" + text + "' (expected a non-negative integer)");
    const long long value = std::stoll(text);
    if (value > INT_MAX) fail(what + " '" + text + "' is too large");
    return static_cast<int>(value);
}

std::vector<int> parse_tokens(const std::string& text) {
    std::vector<int> tokens;
    size_t start = 0;
    for (;;) {
        const size_t comma = text.find(',', start);
        tokens.push_back(parse_int(text.substr(start, comma - start), "token id"));
        if (comma == std::string::npos) return tokens;
        start = comma + 1;
    }
}

void write_logits(const std::string& path, const std::vector<float>& logits) {
    std::vector<unsigned char> bytes(logits.size() * 4);
    for (size_t i = 0; i < logits.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &logits[i], 4);
        for (int b = 0; b < 4; ++b) bytes[i * 4 + b] = static_cast<unsigned char>(u >> (8 * b));
    }
    std::ofstream out(path, std::ios::binary);
    if (!out) fail("cannot open " + path + " for writing: " + std::strerror(errno));
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) fail("cannot write " + path);
}

int run(int argc, char** argv) {
    std::string dir, logits_out;
    std::vector<int> tokens;
    int generate = -1;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::fputs(usage, stdout);
            return 0;
        }
        if (arg == "--tokens" || arg == "--generate" || arg == "--logits-out") {
            if (i + 1 >= argc) fail(arg + " needs a value");
            const std::string value = argv[++i];
            if (arg == "--tokens") tokens = parse_tokens(value);
            else if (arg == "--generate") generate = parse_int(value, "--generate count");
            else logits_out = value;
        } else if (!arg.empty() && arg[0] == '-') {
            fail("unknown option " + arg + " (see --help)");
        } else if (dir.empty()) {
            dir = arg;
        } else {
            fail("unexpected argument " + arg + " (one DIR only)");
        }
    }
    if (dir.empty()) fail("missing DIR (see --help)");
    if (tokens.empty()) fail("missing --tokens (see --help)");

    Checkpoint checkpoint = load(dir);
    std::printf("tensors %zu %llu\n", checkpoint.tensors.size(),
                static_cast<unsigned long long>(checkpoint.total_bytes()));
    std::fflush(stdout);

    const LanguageModel model(std::move(checkpoint));
    const std::vector<float> logits = model.logits(tokens);
    const size_t vocab = static_cast<size_t>(model.config().vocab_size);
    std::fputs("next_token_logits", stdout);
    for (size_t i = logits.size() - vocab; i < logits.size(); ++i) std::printf(" %.9g", logits[i]);
    std::fputs("\n", stdout);
    if (!logits_out.empty()) write_logits(logits_out, logits);

    if (generate >= 0) {
        std::fputs("greedy", stdout);
        for (int id : model.greedy(tokens, generate)) std::printf(" %d", id);
        std::fputs("\n", stdout);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
