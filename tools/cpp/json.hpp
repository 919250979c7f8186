// A small JSON reader for the checkpoint export's metadata.json and config.json.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace json {

class Value {
public:
    enum class Type { Null, Bool, Number, String, Array, Object };

    Type type = Type::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Value> array;
    // A vector rather than a map: keeps the file's order, and std::map of an incomplete type is not allowed.
    std::vector<std::pair<std::string, Value>> object;

    bool is_object() const { return type == Type::Object; }
    bool is_array() const { return type == Type::Array; }
    bool is_string() const { return type == Type::String; }
    bool is_number() const { return type == Type::Number; }

    // nullptr when this is not an object or has no such key.
    const Value* find(const std::string& key) const;
};

const char* type_name(Value::Type type);

// Throws std::runtime_error("byte N: ...") on malformed input.
Value parse(const std::string& text);

}  // namespace json
