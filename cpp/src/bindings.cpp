// pybind11 module flashformer._C: the only file that knows about Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <iterator>
#include <map>
#include <memory>
#include <string>

#include "devices.hpp"
#include "flashformer/fragment_layout.hpp"
#include "flashformer/kernel_config.hpp"
#include "flashformer/ops.hpp"
#include "flashformer/sampling.cuh"
#include "flashformer/trace.hpp"
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

  std::vector<std::string> op_names;
  for (const OpInfo& op : kOps) op_names.push_back(op.name);
  m.attr("OPS") = op_names;
  m.def(
      "step_tasks",
      [](int layers) {
        if (layers < 1) throw std::invalid_argument("step_tasks: layers must be >= 1");
        py::list out;
        for (int t = 0; t < task_count(layers); ++t) {
          const Task task = task_at(t, layers);
          out.append(py::make_tuple(kOps[task.op].name, task.layer));
        }
        return out;
      },
      py::arg("layers"), "The decode step's tasks in order, as (op name, layer) pairs (ops.hpp).");
  m.attr("MAX_BATCH") = kMaxBatch;
  m.attr("MIN_RING_STAGES") = kMinStages;
  m.attr("DEFAULT_ATTN_MIN_WORK") = kDefaultAttnMinWork;
  m.attr("INSTRUMENTED") = has_instrumented_kernels();
  m.attr("TRACE_LAYOUT") = py::dict(py::arg("header") = std::vector<std::string>(kTraceHeaderNames.begin(), kTraceHeaderNames.end()),
                                     py::arg("fields") = std::vector<std::string>(kTraceFieldNames.begin(), kTraceFieldNames.end()));
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
          d["name"] = config_label(c.dims);
          d["world"] = c.dims.world;  // > 1: one rank's shard of config `model` (its heads, kv heads, intermediate)
          d["model"] = c.dims.name;
          d["hidden_size"] = c.dims.hidden;
          d["intermediate_size"] = c.dims.intermediate;
          d["num_heads"] = c.dims.heads;
          d["num_kv_heads"] = c.dims.kv_heads;
          d["head_dim"] = c.dims.head_dim;
          d["vocab_size"] = c.dims.vocab;
          d["padded_vocab_size"] = c.dims.padded_vocab();
          d["family"] = c.dims.family;
          d["qkv_bias"] = c.dims.has(kQkvBias);
          d["qk_norm"] = c.dims.has(kQkNorm);
          d["layers"] = c.dims.layers;
          d["tied"] = c.dims.tied;
          py::list fields;  // how the engine fills each layer's LayerWeights
          for (const LayerWeightField& f : kLayerWeightFields)
            if (f.used_by(c.dims))
              fields.append(py::dict(py::arg("name") = f.name, py::arg("packed") = f.packed(),
                                   py::arg("row_order") = int(f.order),
                                   py::arg("order_param") = row_order_param(f.order, c.dims)));
          d["layer_weights"] = fields;
          py::list stages;  // weight-ring depth at batch 1..MAX_BATCH (smem_split)
          for (int b = 1; b <= kMaxBatch; ++b) stages.append(smem_split(c.dims, b).stages);
          d["ring_stages"] = stages;
          out.append(d);
        }
        return out;
      },
      "The compiled megakernel configs and their shapes.");

  m.attr("WEIGHT_FORMATS") = py::dict(py::arg("bf16") = int(WeightFormat::kBf16), py::arg("fp8") = int(WeightFormat::kFp8));
  m.def(
      "pack_weight_fp8",
      [](std::uintptr_t src, std::uintptr_t scale, std::uintptr_t dst, std::uintptr_t dst_scale, int64_t rows,
         int64_t cols, int row_order, int64_t order_param, std::uintptr_t stream) {
        pack_weight_fp8(reinterpret_cast<const void*>(src), reinterpret_cast<const float*>(scale),
                        reinterpret_cast<void*>(dst), reinterpret_cast<float*>(dst_scale), rows, cols, row_order,
                        order_param, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("scale"), py::arg("dst"), py::arg("dst_scale"), py::arg("rows"), py::arg("cols"),
      py::arg("row_order"), py::arg("order_param") = 0, py::arg("stream") = 0,
      "Pack a row-major e4m3 matrix and its fp32 row scales (device pointers) into the megakernel's e4m3 fragment "
      "order; the scales land in the packed row order.");
  m.def(
      "unpack_weight_fp8",
      [](std::uintptr_t src, std::uintptr_t scale, std::uintptr_t dst, int64_t rows, int64_t cols, int row_order,
         int64_t order_param, std::uintptr_t stream) {
        unpack_weight_fp8(reinterpret_cast<const void*>(src), reinterpret_cast<const float*>(scale),
                          reinterpret_cast<void*>(dst), rows, cols, row_order, order_param,
                          reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("scale"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("row_order"),
      py::arg("order_param") = 0, py::arg("stream") = 0,
      "A packed e4m3 matrix and its packed row scales (device pointers) dequantized into a row-major bf16 matrix: "
      "bf16(data * scale).");
  m.def(
      "source_rows",
      [](int64_t rows, int row_order, int64_t order_param) {
        const std::string problem = pack_shape_problem(rows, kKBlock, row_order, order_param);
        if (!problem.empty()) throw std::invalid_argument("source_rows: " + problem);
        py::array_t<int64_t> out(rows);
        for (int64_t r = 0; r < rows; ++r) out.mutable_data()[r] = source_row(RowOrder(row_order), r, order_param);
        return out;
      },
      py::arg("rows"), py::arg("row_order"), py::arg("order_param") = 0,
      "The source row of each packed row under a row order (fragment_layout.hpp's source_row).");
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
  m.def(
      "pack_shape_problem",
      [](int64_t rows, int64_t cols, int row_order, int64_t order_param, int weight_format) {
        return pack_shape_problem(rows, cols, row_order, order_param, WeightFormat(weight_format));
      },
      py::arg("rows"), py::arg("cols"), py::arg("row_order"), py::arg("order_param") = 0, py::arg("weight_format") = 0,
      "Why a (rows, cols) matrix cannot be packed in that row order and WEIGHT_FORMATS format, or '' "
      "(fragment_layout.hpp).");
  m.def(
      "unpack_weight",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
         std::uintptr_t stream) {
        unpack_weight(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), rows, cols, row_order,
                      order_param, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("row_order"),
      py::arg("order_param") = 0, py::arg("stream") = 0,
      "The inverse of pack_weight: a fragment-ordered bf16 matrix (device pointers) back to row-major.");
  m.def(
      "rms_norm_rows",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t y, int64_t rows, int64_t n, float eps,
         std::uintptr_t stream) {
        rms_norm_rows(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(weight),
                      reinterpret_cast<void*>(y), rows, n, eps, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("rows"), py::arg("n"), py::arg("eps"), py::arg("stream") = 0,
      "Fused RMSNorm of bf16 rows (device pointers) with the reference decoder's roundings (prefill).");
  m.def(
      "silu_mul_rows",
      [](std::uintptr_t gate_up, std::uintptr_t out, int64_t rows, int64_t intermediate, std::uintptr_t stream) {
        silu_mul_rows(reinterpret_cast<const void*>(gate_up), reinterpret_cast<void*>(out), rows, intermediate,
                      reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("intermediate"), py::arg("stream") = 0,
      "silu(gate) * up of bf16 [rows, gate | up] rows (device pointers), rounded as the reference does (prefill).");
  m.def(
      "fragment_sources",
      [](int64_t rows, int64_t cols, int row_order, int64_t order_param, int weight_format) {
        const WeightFormat format = WeightFormat(weight_format);
        const std::string problem = pack_shape_problem(rows, cols, row_order, order_param, format);
        if (!problem.empty()) throw std::invalid_argument("fragment_sources: " + problem);
        if (rows * cols > (int64_t{1} << 26)) throw std::invalid_argument("fragment_sources: at most 2^26 elements");
        py::array_t<int64_t> out(rows * cols);
        int64_t* o = out.mutable_data();
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            o[format == WeightFormat::kFp8 ? fp8_weight_fragment_index(r, c, cols) : weight_fragment_index(r, c, cols)] =
                source_row(RowOrder(row_order), r, order_param) * cols + c;
        return out;
      },
      py::arg("rows"), py::arg("cols"), py::arg("row_order"), py::arg("order_param") = 0, py::arg("weight_format") = 0,
      "For each element of a packed (rows, cols) matrix, the flat index of its source element in the row-major "
      "matrix (the host statement of the fragment order, for tests).");

  py::class_<MegakernelEngine>(m, "MegakernelEngine")
      .def(py::init([](const std::string& config, int device, int n_layers, int max_batch, int max_seq, int weights,
                       int lm_head, int sm_count) {
             return std::make_unique<MegakernelEngine>(config, device, n_layers, max_batch, max_seq,
                                                       WeightFormats{WeightFormat(weights), WeightFormat(lm_head)},
                                                       sm_count);
           }),
           py::arg("config"), py::arg("device"), py::arg("n_layers"), py::arg("max_batch"), py::arg("max_seq"),
           py::arg("weights") = 0, py::arg("lm_head") = 0, py::arg("sm_count") = 0,
           "weights, lm_head: WEIGHT_FORMATS of the layers' matrices and of the LM head; sm_count > 0: run on at most "
           "that many SMs (0: all)")
      .def_property_readonly("exchange_bytes", &MegakernelEngine::exchange_bytes,
                             "a tensor-parallel shard's exchange buffer: bytes each rank allocates, zeroed")
      .def(
          "set_tensor_parallel",
          [](MegakernelEngine& e, int rank, const std::vector<std::uintptr_t>& exchange) {
            std::vector<void*> ptrs;
            for (std::uintptr_t v : exchange) ptrs.push_back(reinterpret_cast<void*>(v));
            e.set_tensor_parallel(rank, ptrs);
          },
          py::arg("rank"), py::arg("exchange"),
          "a shard's rank and every rank's exchange buffer (device pointers as this process maps them; its own at "
          "index rank)")
      .def_property_readonly("weight_formats", [](const MegakernelEngine& e) {
        return py::make_tuple(int(e.formats().layers), int(e.formats().lm_head));
      })
      .def_property_readonly("scratch_bytes", &MegakernelEngine::scratch_bytes)
      .def_property_readonly("num_sms", [](const MegakernelEngine& e) { return e.schedule().num_sms; })
      .def_property_readonly("byte_imbalance", [](const MegakernelEngine& e) { return byte_imbalance(e.schedule()); })
      .def_readwrite("timeout_ms", &MegakernelEngine::timeout_ms)
      .def_property(
          "debug_skip_signal", [](const MegakernelEngine& e) { return e.instr.skip_signal_op; },
          [](MegakernelEngine& e, int op) { e.instr.skip_signal_op = op; },
          "test hook (instrumented build): SM 0 never signals this op (an index into OPS; -1: off)")
      .def_property(
          "timing_variant", [](const MegakernelEngine& e) { return e.instr.timing_variant; },
          [](MegakernelEngine& e, int v) { e.instr.timing_variant = v; },
          "TIMING_VARIANTS flags leaving parts of the step out (instrumented build; outputs are then garbage)")
      .def_readwrite("ring_stages_limit", &MegakernelEngine::ring_stages_limit,
                     "timing only: use at most this many weight-ring stages (0: as planned; else at least MIN_RING_STAGES)")
      .def_readwrite("inflight_stages_limit", &MegakernelEngine::inflight_stages_limit,
                     "most weight-ring stages in flight (issued, not landed) per SM (0: the whole ring)")
      .def_readwrite("weight_l2_policy", &MegakernelEngine::weight_l2_policy,
                     "L2 eviction priority of the weight stream: 0 normal, 1 evict first")
      .def_readwrite("attn_min_work", &MegakernelEngine::attn_min_work,
                     "attention: row-positions per unit below which a context is not split over more SMs (a row's "
                     "chunk holds at least attn_min_work / batch positions, and 16)")
      .def_property_readonly("trace_words", &MegakernelEngine::trace_words, "uint64 words of the step trace")
      .def_property(
          "trace", [](const MegakernelEngine& e) { return reinterpret_cast<std::uintptr_t>(e.instr.trace); },
          [](MegakernelEngine& e, std::uintptr_t ptr) { e.instr.trace = reinterpret_cast<unsigned long long*>(ptr); },
          "device pointer of a trace_words uint64 buffer the next steps fill (trace.hpp; instrumented build), or 0: off")
      .def(
          "bind",
          [](MegakernelEngine& e, std::uintptr_t scratch, const std::vector<std::map<std::string, std::uintptr_t>>& layers,
             std::uintptr_t embed, bool embed_packed, std::uintptr_t final_norm, std::uintptr_t lm_head,
             std::uintptr_t rope_cos, std::uintptr_t rope_sin, std::uintptr_t kv_cache, float rms_eps,
             std::uintptr_t lm_head_scale, std::uintptr_t kv_scale) {
            auto bf = [](std::uintptr_t v) { return reinterpret_cast<bf16_t*>(v); };
            auto f32 = [](std::uintptr_t v) { return reinterpret_cast<const float*>(v); };
            ModelPointers mp;
            const ModelDims& dims = e.config().dims;
            const bool fp8 = e.formats().layers == WeightFormat::kFp8;
            for (const auto& given : layers) {  // one {field name: device pointer} per layer: the config's fields
              LayerWeights l{};                 // (kLayerWeightFields used by it; an e4m3 matrix's scales as
              size_t used = 0;                  // "<name>.scale"); a feature's others stay null
              auto pointer = [&](const std::string& name) {
                const auto it = given.find(name);
                if (it == given.end() || it->second == 0)
                  throw std::invalid_argument("megakernel bind: layer weight '" + name + "' missing");
                ++used;
                return it->second;
              };
              for (const LayerWeightField& f : kLayerWeightFields) {
                if (!f.used_by(dims)) continue;
                if (!f.packed()) {
                  l.*f.vector = bf(pointer(f.name));
                  continue;
                }
                Matrix& m = l.*f.matrix;
                m.data = reinterpret_cast<const void*>(pointer(f.name));
                if (fp8) m.scale = f32(pointer(std::string(f.name) + ".scale"));
              }
              if (given.size() != used)
                throw std::invalid_argument("megakernel bind: unknown layer weight names (expected those of configs()[i]['layer_weights'], and in an FP8 engine '<matrix>.scale' for each matrix)");
              mp.layers.push_back(l);
            }
            mp.embed = bf(embed);
            mp.embed_packed = embed_packed;
            mp.final_norm = bf(final_norm);
            mp.lm_head = Matrix{reinterpret_cast<const void*>(lm_head), f32(lm_head_scale)};
            mp.rope_cos = reinterpret_cast<const float*>(rope_cos);
            mp.rope_sin = reinterpret_cast<const float*>(rope_sin);
            mp.kv_cache = bf(kv_cache);
            if (kv_scale % 16 != 0) throw std::invalid_argument("megakernel bind: kv_scale must be 16-byte aligned");
            mp.kv_scale = reinterpret_cast<float*>(kv_scale);
            mp.rms_eps = rms_eps;
            e.bind(reinterpret_cast<void*>(scratch), mp);
          },
          py::arg("scratch"), py::arg("layers"), py::arg("embed"), py::arg("embed_packed"), py::arg("final_norm"),
          py::arg("lm_head"),
          py::arg("rope_cos"), py::arg("rope_sin"), py::arg("kv_cache"), py::arg("rms_eps"), py::arg("lm_head_scale") = 0,
          py::arg("kv_scale") = 0)
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

  {  // the sampler's constants and layouts (sampling.cuh), so Python states none of them itself
    py::list row_fields;  // (name, byte offset, "f4" | "i4" | "u4") of each Sampler::Row field
#define FF_ROW_FIELD(name, type) row_fields.append(py::make_tuple(#name, offsetof(Sampler::Row, name), type))
    FF_ROW_FIELD(temperature, "f4");
    FF_ROW_FIELD(top_p, "f4");
    FF_ROW_FIELD(min_p, "f4");
    FF_ROW_FIELD(repetition_penalty, "f4");
    FF_ROW_FIELD(presence_penalty, "f4");
    FF_ROW_FIELD(frequency_penalty, "f4");
    FF_ROW_FIELD(top_k, "i4");
    FF_ROW_FIELD(max_tokens, "i4");
    FF_ROW_FIELD(seed_lo, "u4");
    FF_ROW_FIELD(seed_hi, "u4");
    FF_ROW_FIELD(penalized, "i4");
    FF_ROW_FIELD(num_stop, "i4");
#undef FF_ROW_FIELD
    static_assert(sizeof(Sampler::Row) == 12 * 4, "a Sampler::Row field is missing from SAMPLER['row_fields']");
    static_assert(sizeof(Sampler::Record) == 3 * 4 && offsetof(Sampler::Record, token) == 0 &&
                      offsetof(Sampler::Record, finish) == 4 && offsetof(Sampler::Record, flags) == 8,
                  "SAMPLER['record_fields'] is out of date");
    py::dict d;
    d["row_fields"] = row_fields;
    d["row_bytes"] = sizeof(Sampler::Row);
    d["record_fields"] = std::vector<std::string>{"token", "finish", "flags"};
    d["finish"] = py::dict(py::arg("none") = int(Sampler::kNone), py::arg("stop") = int(Sampler::kStop),
                           py::arg("length") = int(Sampler::kLength), py::arg("aborted") = int(Sampler::kAborted));
    d["flags"] = py::dict(py::arg("idle") = int(Sampler::kIdle), py::arg("non_finite") = int(Sampler::kNonFinite));
    d["greedy_below"] = Sampler::kGreedyBelow;
    d["max_logprobs"] = Sampler::kMaxLogprobs;
    d["max_rounds"] = Sampler::kMaxRounds;
    d["hash_multipliers"] = py::make_tuple(Sampler::kHashMul0, Sampler::kHashMul1);
    d["noise_bits"] = Sampler::kNoiseBits;
    m.attr("SAMPLER") = d;
  }
  m.def(
      "sampler_noise_bits",
      [](uint64_t seed, uint32_t step, uint32_t round, uint32_t token) {
        return Sampler::noise_bits(Sampler::noise_key(uint32_t(seed), uint32_t(seed >> 32), step, round), token);
      },
      py::arg("seed"), py::arg("step"), py::arg("round"), py::arg("token"),
      "The sampler's noise bits for (seed, token index of the request, draw round, token id), computed on the host.");
  m.def(
      "host_device_pointer",
      [](std::uintptr_t host) -> std::uintptr_t {
        void* device = nullptr;
        if (cudaHostGetDevicePointer(&device, reinterpret_cast<void*>(host), 0) != cudaSuccess) {
          cudaGetLastError();  // (clear it: not mapped is an answer, not a failure)
          return 0;
        }
        return reinterpret_cast<std::uintptr_t>(device);
      },
      py::arg("host"), "The device address of pinned, mapped host memory (kernels write it directly), or 0.");
  m.def("sampler_max_vocab", &sampler_max_vocab, "The largest vocabulary the sampler holds on the current CUDA device.");
  m.def(
      "sample_tokens",
      [](std::uintptr_t logits, int64_t logits_stride, std::uintptr_t next_tokens, int vocab, int batch, int max_seq,
         std::uintptr_t rows, std::uintptr_t stop_ids, int stop_stride, std::uintptr_t output_counts,
         std::uintptr_t prompt_mask, std::uintptr_t tokens, std::uintptr_t positions, std::uintptr_t generated,
         std::uintptr_t status, std::uintptr_t records, int device, std::uintptr_t stream) {
        Sampler::Args a{};
        a.logits = reinterpret_cast<const float*>(logits);
        a.logits_stride = logits_stride;
        a.next_tokens = reinterpret_cast<const int32_t*>(next_tokens);
        a.vocab = vocab;
        a.batch = batch;
        a.max_seq = max_seq;
        a.rows = reinterpret_cast<const Sampler::Row*>(rows);
        a.stop_ids = reinterpret_cast<const int32_t*>(stop_ids);
        a.stop_stride = stop_stride;
        a.output_counts = reinterpret_cast<int32_t*>(output_counts);
        a.prompt_mask = reinterpret_cast<const uint8_t*>(prompt_mask);
        a.tokens = reinterpret_cast<int64_t*>(tokens);
        a.positions = reinterpret_cast<int64_t*>(positions);
        a.generated = reinterpret_cast<int32_t*>(generated);
        a.status = reinterpret_cast<int32_t*>(status);
        a.records = reinterpret_cast<Sampler::Record*>(records);
        sample_tokens(a, device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("logits"), py::arg("logits_stride"), py::arg("next_tokens"), py::arg("vocab"), py::arg("batch"),
      py::arg("max_seq"), py::arg("rows"), py::arg("stop_ids"), py::arg("stop_stride"), py::arg("output_counts"),
      py::arg("prompt_mask"), py::arg("tokens"), py::arg("positions"), py::arg("generated"), py::arg("status"),
      py::arg("records"), py::arg("device"), py::arg("stream") = 0,
      "Sample every row's next token on the device and feed it to the next decode step (device pointers; "
      "sampling.cuh). logits 0: take next_tokens, the fused arg-max.");

  py::module_ testing = m.def_submodule("testing", "Kernel probes used by the test suite and the benchmark");
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
