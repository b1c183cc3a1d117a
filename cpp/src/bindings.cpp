// pybind11 module flashformer._C: the only file that knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include "engine.hpp"
#include "flashformer/kernel_config.hpp"
#include "kernels/launch.hpp"
#include "megakernel_engine.hpp"

namespace py = pybind11;
using namespace flashformer;

namespace {

py::dict device_dict(const DeviceInfo& d) {
  py::dict out;
  out["ordinal"] = d.ordinal;
  out["name"] = d.name;
  out["compute_capability"] = py::make_tuple(d.major, d.minor);
  out["supported"] = d.supported();
  out["sm_count"] = d.sm_count;
  out["smem_per_block_optin"] = d.smem_per_block_optin;
  out["l2_bytes"] = d.l2_bytes;
  out["global_mem_bytes"] = d.global_mem_bytes;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashformer's compiled CUDA core";
  m.attr("__version__") = FLASHFORMER_VERSION;

  m.def("cuda_available", &cuda_available, "True when a CUDA device of compute capability 9.0 is visible.");
  m.def(
      "core_info",
      [] {
        py::dict out;
        out["version"] = FLASHFORMER_VERSION;
        out["compiled_arch"] = kCompiledArch;
        out["cuda_runtime"] = CUDART_VERSION;
        py::list devices;
        for (const DeviceInfo& d : list_devices()) devices.append(device_dict(d));
        out["devices"] = devices;
        return out;
      },
      "Facts about the compiled core and the CUDA devices it sees.");

  py::class_<Engine>(m, "Engine")
      .def(py::init<int>(), py::arg("device") = 0)
      .def_property_readonly("device", [](const Engine& e) { return device_dict(e.device()); });

  m.attr("OPS") = py::cast(std::vector<std::string>(kOpNames.begin(), kOpNames.end()));
  m.attr("MAX_BATCH") = kMaxBatch;
  m.attr("MIN_RING_STAGES") = kMinStages;
  m.attr("TRACE_LAYOUT") = py::dict(py::arg("header") = std::vector<std::string>(kTraceHeaderNames.begin(), kTraceHeaderNames.end()),
                                     py::arg("fields") = std::vector<std::string>(kTraceFieldNames.begin(), kTraceFieldNames.end()),
                                     py::arg("layer_ops") = kLayerOps);
  m.attr("TIMING_VARIANTS") = py::dict(py::arg("skip_waits") = int(kSkipWaits), py::arg("skip_attention") = int(kSkipAttention),
                                       py::arg("skip_norm") = int(kSkipNorm), py::arg("skip_epilogue") = int(kSkipEpilogue),
                                       py::arg("skip_math") = int(kSkipMath), py::arg("poll_every_spin") = int(kPollEverySpin),
                                       py::arg("skip_loads") = int(kSkipLoads), py::arg("skip_reduce") = int(kSkipReduce),
                                       py::arg("relaxed_signals") = int(kRelaxedSignals));
  m.def(
      "configs",
      [] {
        py::list out;
        for (const CompiledConfig& c : compiled_configs()) {
          py::dict d;
          d["name"] = c.dims.name;
          d["hidden_size"] = c.dims.hidden;
          d["intermediate_size"] = c.dims.intermediate;
          d["num_heads"] = c.dims.heads;
          d["num_kv_heads"] = c.dims.kv_heads;
          d["head_dim"] = c.dims.head_dim;
          d["vocab_size"] = c.dims.vocab;
          py::list stages;  // weight-ring depth at batch 1..MAX_BATCH (smem_split)
          for (int b = 1; b <= kMaxBatch; ++b) stages.append(smem_split(c.dims, b).stages);
          d["ring_stages"] = stages;
          out.append(d);
        }
        return out;
      },
      "The compiled megakernel configs and their shapes.");

  m.attr("ROW_ORDERS") = py::dict(py::arg("identity") = int(RowOrder::kIdentity),
                                  py::arg("rope_pairs") = int(RowOrder::kRopePairs),
                                  py::arg("gate_up") = int(RowOrder::kGateUp));
  m.def(
      "pack_weight",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
         std::uintptr_t stream) {
        pack_weight(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), rows, cols, row_order,
                    order_param, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("row_order"),
      py::arg("order_param") = 0, py::arg("stream") = 0,
      "Pack a row-major bf16 matrix (device pointers) into the megakernel's fragment order.");

  using LayerPtrs = std::array<std::uintptr_t, 6>;  // qkv, o, gate_up, down, attn_norm, mlp_norm
  py::class_<MegakernelEngine>(m, "MegakernelEngine")
      .def(py::init<std::string, int, int, int, int>(), py::arg("config"), py::arg("device"), py::arg("n_layers"),
           py::arg("max_batch"), py::arg("max_seq"))
      .def_property_readonly("scratch_bytes", &MegakernelEngine::scratch_bytes)
      .def_property_readonly("num_sms", [](const MegakernelEngine& e) { return e.schedule().num_sms; })
      .def_property_readonly("byte_imbalance", [](const MegakernelEngine& e) { return byte_imbalance(e.schedule()); })
      .def_readwrite("timeout_ms", &MegakernelEngine::timeout_ms)
      .def_readwrite("debug_skip_signal", &MegakernelEngine::debug_skip_signal)
      .def_readwrite("timing_variant", &MegakernelEngine::timing_variant,
                     "TIMING_VARIANTS flags leaving parts of the step out (outputs are then garbage)")
      .def_readwrite("ring_stages_limit", &MegakernelEngine::ring_stages_limit,
                     "timing only: use at most this many weight-ring stages (0: as planned; else at least MIN_RING_STAGES)")
      .def_readwrite("inflight_stages_limit", &MegakernelEngine::inflight_stages_limit,
                     "most weight-ring stages in flight (issued, not landed) per SM (0: the whole ring)")
      .def_readwrite("weight_l2_policy", &MegakernelEngine::weight_l2_policy,
                     "L2 eviction priority of the weight stream: 0 normal, 1 evict first")
      .def_property_readonly("trace_words", &MegakernelEngine::trace_words, "uint64 words of the step trace")
      .def_property(
          "trace", [](const MegakernelEngine& e) { return reinterpret_cast<std::uintptr_t>(e.trace); },
          [](MegakernelEngine& e, std::uintptr_t ptr) { e.trace = reinterpret_cast<unsigned long long*>(ptr); },
          "device pointer of a trace_words uint64 buffer the next steps fill (trace.hpp), or 0: off")
      .def(
          "bind",
          [](MegakernelEngine& e, std::uintptr_t scratch, const std::vector<LayerPtrs>& layers, std::uintptr_t embed,
             std::uintptr_t final_norm, std::uintptr_t lm_head, std::uintptr_t rope_cos, std::uintptr_t rope_sin,
             std::uintptr_t kv_cache, float rms_eps) {
            auto bf = [](std::uintptr_t v) { return reinterpret_cast<bf16_t*>(v); };
            ModelPointers mp;
            for (const LayerPtrs& l : layers) mp.layers.push_back({bf(l[0]), bf(l[1]), bf(l[2]), bf(l[3]), bf(l[4]), bf(l[5])});
            mp.embed = bf(embed);
            mp.final_norm = bf(final_norm);
            mp.lm_head = bf(lm_head);
            mp.rope_cos = reinterpret_cast<const float*>(rope_cos);
            mp.rope_sin = reinterpret_cast<const float*>(rope_sin);
            mp.kv_cache = bf(kv_cache);
            mp.rms_eps = rms_eps;
            e.bind(reinterpret_cast<void*>(scratch), mp);
          },
          py::arg("scratch"), py::arg("layers"), py::arg("embed"), py::arg("final_norm"), py::arg("lm_head"),
          py::arg("rope_cos"), py::arg("rope_sin"), py::arg("kv_cache"), py::arg("rms_eps"))
      .def(
          "step",
          [](MegakernelEngine& e, std::uintptr_t tokens, std::uintptr_t positions, std::uintptr_t next_tokens,
             std::uintptr_t logits, int batch, std::uintptr_t stream) {
            e.step(reinterpret_cast<const int64_t*>(tokens), reinterpret_cast<const int64_t*>(positions),
                   reinterpret_cast<int32_t*>(next_tokens), reinterpret_cast<float*>(logits), batch,
                   reinterpret_cast<cudaStream_t>(stream));
          },
          py::arg("tokens"), py::arg("positions"), py::arg("next_tokens"), py::arg("logits"), py::arg("batch"),
          py::arg("stream") = 0)
      .def(
          "check",
          [](MegakernelEngine& e, std::uintptr_t stream) {
            py::gil_scoped_release release;
            e.check(reinterpret_cast<cudaStream_t>(stream));
          },
          py::arg("stream") = 0, "Wait for the last step on `stream`; raise RuntimeError if it aborted.")
      .def(
          "record",
          [](MegakernelEngine& e, std::uintptr_t stream) { e.record(reinterpret_cast<cudaStream_t>(stream)); },
          py::arg("stream") = 0,
          "Queue copies of the last step's outcome (error words, arg-max tokens) to the host; no wait.")
      .def(
          "check_recorded",
          [](MegakernelEngine& e) {
            py::gil_scoped_release release;
            e.check_recorded();
          },
          "Wait for what record() queued (if anything); raise RuntimeError if that step aborted.")
      .def_property_readonly("checked_next_tokens", &MegakernelEngine::checked_next_tokens,
                             "arg-max tokens of the step the last successful check() waited for, one per batch row");

  py::module_ testing = m.def_submodule("testing", "Kernel probes used by the test suite");
  testing.def(
      "tma_tile_copy",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t rows, int64_t cols, std::uintptr_t stream) {
        py::gil_scoped_release release;
        tma_tile_copy(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), rows, cols,
                      reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("stream") = 0,
      "Copy a row-major bf16 matrix through shared memory in 64x64 TMA tiles (device pointers).");
  testing.def(
      "read_probe",
      [](std::uintptr_t src, int64_t bytes, std::uintptr_t sink, std::uintptr_t stream) {
        read_probe(reinterpret_cast<const void*>(src), bytes, reinterpret_cast<void*>(sink),
                   reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("bytes"), py::arg("sink"), py::arg("stream") = 0,
      "Stream-read `bytes` at device pointer src once from every SM (time it for read bandwidth); "
      "sink: a device pointer to 4 writable bytes.");
}
