#include "json.hpp"

#include <cstdlib>
#include <stdexcept>

namespace json {

const Value* Value::find(const std::string& key) const {
    for (const auto& member : object)
        if (member.first == key) return &member.second;
    return nullptr;
}

const char* type_name(Value::Type type) {
    switch (type) {
        case Value::Type::Null: return "null";
        case Value::Type::Bool: return "boolean";
        case Value::Type::Number: return "number";
        case Value::Type::String: return "string";
        case Value::Type::Array: return "array";
        case Value::Type::Object: return "object";
    }
    return "?";
}

namespace {

// Bounds recursion so that a hostile file cannot overflow the stack.
constexpr int max_depth = 512;

class Parser {
public:
    explicit Parser(const std::string& text) : s(text) {}

    Value document() {
        Value v = value(0);
        skip_space();
        if (pos != s.size()) fail("unexpected content after the JSON value");
        return v;
    }

private:
    const std::string& s;
    size_t pos = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error("byte " + std::to_string(pos) + ": " + what);
    }

    [[noreturn]] void fail_unexpected(const std::string& expected) const {
        if (pos >= s.size()) fail("expected " + expected + ", got end of input");
        unsigned char c = s[pos];
        std::string got = (c >= 0x20 && c < 0x7f) ? "'" + std::string(1, c) + "'" : "byte 0x" + hex(c);
        fail("expected " + expected + ", got " + got);
    }

    static std::string hex(unsigned char c) {
        const char* digits = "0123456789abcdef";
        return {digits[c >> 4], digits[c & 15]};
    }

    void skip_space() {
        while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) ++pos;
    }

    void expect_word(const char* word) {
        for (const char* w = word; *w; ++w, ++pos)
            if (pos >= s.size() || s[pos] != *w) fail_unexpected(std::string("'") + word + "'");
    }

    Value value(int depth) {
        if (depth > max_depth) fail("nesting deeper than " + std::to_string(max_depth));
        skip_space();
        if (pos >= s.size()) fail_unexpected("a value");
        Value v;
        switch (s[pos]) {
            case '{': object(v, depth); break;
            case '[': array(v, depth); break;
            case '"': v.type = Value::Type::String; v.string = string(); break;
            case 't': expect_word("true"); v.type = Value::Type::Bool; v.boolean = true; break;
            case 'f': expect_word("false"); v.type = Value::Type::Bool; break;
            case 'n': expect_word("null"); break;
            default: v.type = Value::Type::Number; v.number = number(); break;
        }
        return v;
    }

    void object(Value& v, int depth) {
        v.type = Value::Type::Object;
        ++pos;
        skip_space();
        if (pos < s.size() && s[pos] == '}') { ++pos; return; }
        for (;;) {
            skip_space();
            if (pos >= s.size() || s[pos] != '"') fail_unexpected("a string key");
            size_t key_pos = pos;
            std::string key = string();
            // Silently keeping one of two entries for the same tensor would hide a broken export.
            if (v.find(key)) { pos = key_pos; fail("duplicate key \"" + key + "\""); }
            skip_space();
            if (pos >= s.size() || s[pos] != ':') fail_unexpected("':'");
            ++pos;
            v.object.emplace_back(std::move(key), value(depth + 1));
            skip_space();
            if (pos < s.size() && s[pos] == ',') { ++pos; continue; }
            if (pos < s.size() && s[pos] == '}') { ++pos; return; }
            fail_unexpected("',' or '}'");
        }
    }

    void array(Value& v, int depth) {
        v.type = Value::Type::Array;
        ++pos;
        skip_space();
        if (pos < s.size() && s[pos] == ']') { ++pos; return; }
        for (;;) {
            v.array.push_back(value(depth + 1));
            skip_space();
            if (pos < s.size() && s[pos] == ',') { ++pos; continue; }
            if (pos < s.size() && s[pos] == ']') { ++pos; return; }
            fail_unexpected("',' or ']'");
        }
    }

    unsigned hex4() {
        unsigned code = 0;
        for (int i = 0; i < 4; ++i, ++pos) {
            if (pos >= s.size()) fail_unexpected("4 hex digits after \\u");
            char c = s[pos];
            unsigned d;
            if (c >= '0' && c <= '9') d = c - '0';
            else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
            else fail_unexpected("4 hex digits after \\u");
            code = code * 16 + d;
        }
        return code;
    }

    static void append_utf8(std::string& out, unsigned code) {
        if (code < 0x80) {
            out += char(code);
        } else if (code < 0x800) {
            out += char(0xc0 | (code >> 6));
            out += char(0x80 | (code & 0x3f));
        } else if (code < 0x10000) {
            out += char(0xe0 | (code >> 12));
            out += char(0x80 | ((code >> 6) & 0x3f));
            out += char(0x80 | (code & 0x3f));
        } else {
            out += char(0xf0 | (code >> 18));
            out += char(0x80 | ((code >> 12) & 0x3f));
            out += char(0x80 | ((code >> 6) & 0x3f));
            out += char(0x80 | (code & 0x3f));
        }
    }

    // Code point of a \u escape, combining a UTF-16 surrogate pair; pos is just after "\u".
    unsigned unicode_escape() {
        size_t start = pos - 2;
        unsigned code = hex4();
        if (code >= 0xdc00 && code <= 0xdfff) { pos = start; fail("unpaired low surrogate in \\u escape"); }
        if (code < 0xd800 || code > 0xdbff) return code;
        if (pos + 1 >= s.size() || s[pos] != '\\' || s[pos + 1] != 'u') { pos = start; fail("unpaired high surrogate in \\u escape"); }
        pos += 2;
        unsigned low = hex4();
        if (low < 0xdc00 || low > 0xdfff) { pos = start; fail("high surrogate not followed by a low surrogate"); }
        return 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
    }

    std::string string() {
        size_t start = pos;
        ++pos;
        std::string out;
        for (;;) {
            if (pos >= s.size()) { pos = start; fail("unterminated string"); }
            unsigned char c = s[pos];
            if (c == '"') { ++pos; return out; }
            if (c < 0x20) fail("control character 0x" + hex(c) + " in string (must be escaped)");
            if (c != '\\') { out += char(c); ++pos; continue; }
            if (++pos >= s.size()) { pos = start; fail("unterminated string"); }
            char e = s[pos++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': append_utf8(out, unicode_escape()); break;
                default: pos -= 2; fail(std::string("invalid escape '\\") + e + "'");
            }
        }
    }

    bool digit() const { return pos < s.size() && s[pos] >= '0' && s[pos] <= '9'; }

    // Checks the strict JSON grammar (strtod alone would accept "0x1p3", "inf", "+1", ".5").
    double number() {
        size_t start = pos;
        if (pos < s.size() && s[pos] == '-') ++pos;
        if (!digit()) fail_unexpected("a value");
        if (s[pos] == '0') ++pos;
        else while (digit()) ++pos;
        if (pos < s.size() && s[pos] == '.') {
            ++pos;
            if (!digit()) fail_unexpected("a digit after '.'");
            while (digit()) ++pos;
        }
        if (pos < s.size() && (s[pos] == 'e' || s[pos] == 'E')) {
            ++pos;
            if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) ++pos;
            if (!digit()) fail_unexpected("a digit in the exponent");
            while (digit()) ++pos;
        }
        return std::strtod(s.substr(start, pos - start).c_str(), nullptr);
    }
};

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

}  // namespace json
