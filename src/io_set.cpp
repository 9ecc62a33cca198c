// OutputSet: the files of one command, moved into place together (io.hpp).
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>

#include "detail/require.hpp"
#include "levattn/error.hpp"
#include "levattn/io.hpp"

namespace levattn {
namespace {

namespace fs = std::filesystem;

// A name next to `target` that nothing uses yet: target + tag + 16 hex digits.
fs::path sibling(const fs::path& target, const char* tag) {
  static thread_local std::mt19937_64 gen{std::random_device{}()};
  for (int attempt = 0; attempt < 64; ++attempt) {
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(gen()));
    fs::path p = target;
    p += std::string(tag) + hex;
    std::error_code ec;
    if (!fs::exists(fs::symlink_status(p, ec))) return p;
  }
  detail::fail(ErrorKind::io, target.string(), "cannot find a free temporary name");
}

bool rename_ok(const fs::path& from, const fs::path& to) {
  return std::rename(from.c_str(), to.c_str()) == 0;
}

}  // namespace

OutputSet::~OutputSet() {
  for (const Entry& e : entries_) std::remove(e.staged.c_str());
}

void OutputSet::stage(const fs::path& target, const std::function<void(const fs::path&)>& write) {
  std::error_code ec;
  if (fs::is_directory(target, ec))
    detail::fail(ErrorKind::io, target.string(), "is a directory, not a file that can be replaced");
  for (const Entry& e : entries_)
    LEVATTN_REQUIRE_FILE(!(e.target == target), target.string(), "named twice among one command's outputs");
  Entry e;
  e.target = target;
  e.staged = sibling(target, ".new.");
  write(e.staged);  // atomic: the staged name exists only once complete
  entries_.push_back(std::move(e));
}

void OutputSet::add_npy(const fs::path& path, const Array& array) {
  stage(path, [&](const fs::path& p) { write_npy(p, array); });
}

void OutputSet::add_npz(const fs::path& path, const std::vector<std::pair<std::string, Array>>& arrays) {
  stage(path, [&](const fs::path& p) { write_npz(p, arrays); });
}

void OutputSet::add_text(const fs::path& path, std::string_view text) {
  stage(path, [&](const fs::path& p) { write_text_file(p, text); });
}

void OutputSet::commit() {
  // 1. Move every existing target aside; 2. move every staged file into place. On a failure, undo
  // in reverse: remove what was moved in, put back what was moved aside.
  std::string failed, error;  // the target that could not be moved, and why
  std::size_t aside = 0, placed = 0;
  for (; aside < entries_.size() && error.empty(); ++aside) {
    Entry& e = entries_[aside];
    std::error_code ec;
    if (!fs::exists(fs::symlink_status(e.target, ec))) continue;
    e.backup = sibling(e.target, ".old.");
    if (!rename_ok(e.target, e.backup)) {
      error = std::string("cannot move the existing file aside: ") + std::strerror(errno);
      failed = e.target.string();
      e.backup.clear();
      break;
    }
  }
  if (error.empty())
    for (; placed < entries_.size(); ++placed) {
      Entry& e = entries_[placed];
      if (!rename_ok(e.staged, e.target)) {
        error = std::string("cannot move the new file into place: ") + std::strerror(errno);
        failed = e.target.string();
        break;
      }
      e.staged.clear();
    }
  if (!error.empty()) {
    for (std::size_t i = 0; i < placed; ++i) std::remove(entries_[i].target.c_str());
    for (Entry& e : entries_)
      if (!e.backup.empty()) rename_ok(e.backup, e.target);
    detail::fail(ErrorKind::io, failed, error, " (no output was changed)");
  }
  for (Entry& e : entries_)
    if (!e.backup.empty()) std::remove(e.backup.c_str());
  entries_.clear();
}

}  // namespace levattn
