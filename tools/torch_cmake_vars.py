"""Write the torch build facts CMakeLists.txt needs as CMake `set()` lines.

Usage: python tools/torch_cmake_vars.py OUT.cmake
"""

import sys

import torch
import torch.utils.cpp_extension as cpp


def main(out_path: str) -> None:
    facts = {
        "TORCH_INCLUDE_DIRS_RAW": ";".join(cpp.include_paths()),
        "TORCH_LIBRARY_DIRS_RAW": ";".join(cpp.library_paths()),
        "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda or "",
    }
    with open(out_path, "w") as f:
        for key, value in facts.items():
            f.write(f'set({key} "{value}")\n')


if __name__ == "__main__":
    main(sys.argv[1])
