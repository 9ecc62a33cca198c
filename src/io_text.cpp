#include <cstdint>
#include <span>

#include "npy_format.hpp"
#include "levattn/io.hpp"

namespace levattn {

void write_text_file(const std::filesystem::path& path, std::string_view text) {
  const std::span<const std::uint8_t> bytes(reinterpret_cast<const std::uint8_t*>(text.data()),
                                            text.size());
  const std::span<const std::uint8_t> pieces[] = {bytes};
  detail::write_file_atomically(path, pieces);
}

}  // namespace levattn
