# Finds the CUTLASS/CuTe headers; no CUTLASS source is vendored in this repository.
#
# Looked for, in order:
#   1. -DCUTLASS_DIR=<dir>           (a CUTLASS checkout, or its include/ folder)
#   2. the CUTLASS_DIR environment variable (same forms)
#   3. the pip package nvidia-cutlass (cutlass_library/source/include), a pinned build
#      requirement in pyproject.toml, found through ${Python_EXECUTABLE}
#
# Defines the INTERFACE target flashformer::cutlass and Cutlass_INCLUDE_DIR.

set(CUTLASS_DIR "$ENV{CUTLASS_DIR}" CACHE PATH "CUTLASS checkout or include folder (optional)")

set(_ff_cutlass_candidates)
if(CUTLASS_DIR)
  list(APPEND _ff_cutlass_candidates "${CUTLASS_DIR}/include" "${CUTLASS_DIR}")
elseif(Python_EXECUTABLE)
  # find_spec locates the package without importing it (its __init__ pulls heavy deps).
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u; s = u.find_spec('cutlass_library'); print(s.submodule_search_locations[0] if s else '')"
    OUTPUT_VARIABLE _ff_cutlass_pkg OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_ff_cutlass_pkg)
    list(APPEND _ff_cutlass_candidates "${_ff_cutlass_pkg}/source/include")
  endif()
endif()

unset(Cutlass_INCLUDE_DIR CACHE)
find_path(Cutlass_INCLUDE_DIR NAMES cute/tensor.hpp cutlass/cutlass.h
          PATHS ${_ff_cutlass_candidates} NO_DEFAULT_PATH)

list(JOIN _ff_cutlass_candidates ", " _ff_cutlass_looked_in)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Cutlass
  REQUIRED_VARS Cutlass_INCLUDE_DIR
  REASON_FAILURE_MESSAGE
    "CUTLASS/CuTe headers not found (looked in: ${_ff_cutlass_looked_in}). Install the build requirement `pip install nvidia-cutlass==4.2.0.0`, or pass -DCUTLASS_DIR=<cutlass checkout or its include/> (pip: -Ccmake.define.CUTLASS_DIR=...), or set the CUTLASS_DIR environment variable.")

if(Cutlass_FOUND AND NOT TARGET flashformer::cutlass)
  add_library(flashformer::cutlass INTERFACE IMPORTED)
  set_target_properties(flashformer::cutlass PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${Cutlass_INCLUDE_DIR}")
endif()
