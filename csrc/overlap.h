// Alias check shared by in-place multi-tensor ops: done in C++ because a Python loop over a
// model-sized list costs more than the GPU kernel itself.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace ntkcl_fast {

struct NamedList {
  at::TensorList list;
  const char* name;
};

// ValueError naming both tensors when any tensor of a `written` list shares memory with another
// written tensor (of any written list) or with a tensor of a `read` list (read tensors may overlap
// each other). Sorting the byte ranges keeps it O(n log n).
inline void check_no_overlap(std::initializer_list<NamedList> written, std::initializer_list<NamedList> read) {
  struct Span {
    uintptr_t lo, hi;
    bool written;
    const char* name;
    size_t index;
  };
  std::vector<Span> spans;
  auto add = [&spans](const NamedList& named, bool is_written) {
    for (size_t i = 0; i < named.list.size(); ++i) {
      const at::Tensor& t = named.list[i];
      if (!t.defined() || t.numel() == 0) continue;
      uintptr_t lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      uintptr_t hi = lo;
      const int64_t item = t.element_size();
      for (int64_t d = 0; d < t.dim(); ++d) {
        const int64_t extent = (t.size(d) - 1) * t.stride(d) * item;
        if (extent < 0) lo -= static_cast<uintptr_t>(-extent); else hi += static_cast<uintptr_t>(extent);
      }
      spans.push_back({lo, hi + static_cast<uintptr_t>(item), is_written, named.name, i});
    }
  };
  for (const NamedList& w : written) add(w, true);
  for (const NamedList& r : read) add(r, false);
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  uintptr_t end_any = 0, end_written = 0;
  const Span* last_any = nullptr;
  const Span* last_written = nullptr;
  for (const Span& s : spans) {
    const Span* other = nullptr;
    if (s.written && last_any && s.lo < end_any) other = last_any;
    else if (last_written && s.lo < end_written) other = last_written;
    TORCH_CHECK_VALUE(other == nullptr, s.name, "[", s.index, "] shares memory with ", other->name, "[",
                      other->index, "]; in-place outputs must not alias any input");
    if (!last_any || s.hi > end_any) end_any = s.hi, last_any = &s;
    if (s.written && (!last_written || s.hi > end_written)) end_written = s.hi, last_written = &s;
  }
}

inline void check_no_overlap(at::TensorList written, const char* written_name, at::TensorList read,
                             const char* read_name) {
  check_no_overlap({{written, written_name}}, {{read, read_name}});
}

}  // namespace ntkcl_fast
