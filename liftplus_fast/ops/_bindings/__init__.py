"""The Python side of each kernel-backed op: its call, its one autograd and its fake kernel.

A binding module knows the op's schema (:mod:`.._library`), never the dispatcher or the public
op: the public op (``ops/<op>.py``) registers the native namespace's binding and the Triton
package (``ops/triton``) its own, each importing the binding, so neither imports the other.
"""
