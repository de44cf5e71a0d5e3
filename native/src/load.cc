// lstm-serve-load: the benchmarks' native load generator (bench/README.md, bench/native_load.py).
//
//   lstm-serve-load --address 127.0.0.1:8001 --mode stream --model bench-lstm --sessions 256
//       --steps 1 [--per-channel 128] [--warmup 0.8] [--seconds 3] [--vocab 1000] [--seed 0]
//       [--sample 32] [--threads 1] [--max-seconds 60] [--max-messages 2000000]
//       [--own-connections 0] [--text 0]
//   lstm-serve-load --address 127.0.0.1:50123 --mode echo --sessions 256
//       --request-bytes 12 --reply-bytes 78 ...
//
// The same loads as bench/load.py's `drive`, without Python per message: `stream` opens one
// lstmserve.v1.LstmServe/Stream call per session (`open` for the model, then chunks seq = 1, 2,
// ... of `steps` random token ids, ping-pong, then `end`); `echo` drives bench/echo.py's
// /bench.Echo/Stream with messages of the given sizes. Once every session is open, `warmup`
// seconds, then the window of `seconds`: messages answered inside it are counted, latencies of
// messages sent and answered inside it kept (bench.load.Window's rule). Stdout: a line
// {"event": "start"} at the window's start, {"event": "end"} at its end (so the caller samples
// the server's CPU at the same edges), then one {"event": "result", ...} line with the counts,
// latency percentiles, errors, this process's CPU seconds in the window, and, for up to
// `sample` sessions spread over all of them, every token id sent and every reply's
// probabilities (base64 of little-endian float32) for an offline exactness check. `--text 1`
// sends each chunk as `steps` random letters "a".."z" (`SequenceInput.text`, for
// a model with a character tokenizer) instead of token ids, with `--sample 0` (no offline check).
//
// One completion queue per thread (`--threads`, default 1), each session's events on its
// queue's thread: no executor hand-off between gRPC and the session (measured cheaper than the
// callback API or two queues). Sessions are spread over max(1, min(8, sessions / per-channel))
// channels (bench/load.py's rule); like grpc.aio's channels in bench/load.py, channels of equal
// arguments share one HTTP/2 connection (gRPC's global subchannel pool), so both clients offer
// a server the same connections; `--own-connections 1` gives each channel its own. Bounds: every call has a deadline of `max-seconds`, the run stops sending after
// `max-messages` in all, and calls still running at `max-seconds` are cancelled (an error).
// It connects to `--address` and nowhere else.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lstmserve/v1/lstm_serve.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
using lstmserve::v1::StreamRequest;
using lstmserve::v1::StreamResponse;

constexpr char kStreamMethod[] = "/lstmserve.v1.LstmServe/Stream";
constexpr char kEchoMethod[] = "/bench.Echo/Stream";  // bench/echo.py's METHOD
constexpr int64_t kNever = INT64_MAX;

struct Options {
  std::string address, mode = "stream", model = "bench-lstm";
  int sessions = 1, steps = 1, per_channel = 128, vocab = 1000, sample = 32, threads = 1;
  bool own_connections = false, text = false;
  uint64_t seed = 0, max_messages = 2'000'000;
  double warmup_s = 0.8, seconds = 3.0, max_seconds = 60.0;
  size_t request_bytes = 0, reply_bytes = 16;  // echo
};

int64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

double CpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         1e-6 * (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// splitmix64: session i's token ids depend on (seed, i) only.
uint64_t NextRandom(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// What one completion-queue thread measured (written by that thread only).
struct Stats {
  uint64_t completed = 0;
  std::vector<int64_t> latencies_ns;
};

// A sampled session's record for the exactness check.
struct Sample {
  int session = 0;
  int64_t version = 0;  // the model version its `opened` reply named
  std::vector<int64_t> tokens;
  std::vector<float> probabilities;  // (replies, classes)
  size_t classes = 0;
};

class Session;

// The run's shared state: the window's edges, the barrier every session passes once open, the
// message bound, errors and the count of sessions done.
class Run {
 public:
  explicit Run(const Options& opt) : opt_(opt) {}
  const Options& opt() const { return opt_; }
  int64_t start_ns() const { return start_ns_.load(std::memory_order_acquire); }
  int64_t end_ns() const { return end_ns_.load(std::memory_order_acquire); }
  bool TakeMessage() { return sent_.fetch_add(1, std::memory_order_relaxed) < opt_.max_messages; }
  uint64_t sent() const { return std::min<uint64_t>(sent_.load(), opt_.max_messages); }

  void Arrive(Session* ready);  // nullptr: a session that failed before it was ready
  void Done();
  void Error(const std::string& what);
  bool WaitOpened(int64_t deadline_ns);  // false: not by the deadline, or none opened
  bool WaitDone(int64_t deadline_ns);
  uint64_t errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }
  std::string first_error() {
    std::lock_guard<std::mutex> lock(mu_);
    return first_error_;
  }

 private:
  const Options& opt_;
  std::atomic<int64_t> start_ns_{kNever}, end_ns_{kNever};
  std::atomic<uint64_t> sent_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0, done_ = 0, released_ = 0;
  bool opened_ = false;
  std::vector<Session*> waiting_;
  uint64_t errors_ = 0;
  std::string first_error_;
};

enum Op : uintptr_t { kStart = 1, kWrite = 2, kRead = 3, kWritesDone = 4, kFinish = 5 };

// One Stream (or echo) call, ping-pong: a message and its read are posted together; the next
// step runs once both completed. Events arrive on its completion queue's one thread.
class Session {
 public:
  Session(Run* run, int index, grpc::GenericStub* stub, grpc::CompletionQueue* cq, Stats* stats,
          Sample* sample)
      : run_(run), opt_(run->opt()), index_(index), stats_(stats), sample_(sample) {
    random_ = opt_.seed * 0x2545F4914F6CDD1Dull + static_cast<uint64_t>(index) + 1;
    ctx_.set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(1000 * opt_.max_seconds)));
    const bool echo = opt_.mode == "echo";
    if (echo) {
      ctx_.AddMetadata("reply-size", std::to_string(opt_.reply_bytes));
      std::string payload(opt_.request_bytes, '\x01');
      grpc::Slice slice(payload);
      echo_payload_ = grpc::ByteBuffer(&slice, 1);
    } else if (opt_.text) {
      request_.mutable_chunk()->mutable_input()->mutable_text()->assign(opt_.steps, 'a');
    } else {
      request_.mutable_chunk()->mutable_input()->mutable_tokens()->mutable_ids()->Resize(
          opt_.steps, 0);
    }
    call_ = stub->PrepareCall(&ctx_, echo ? kEchoMethod : kStreamMethod, cq);
    call_->StartCall(Tag(kStart));
  }

  void Cancel() { ctx_.TryCancel(); }

  void OnEvent(Op op, bool ok) {
    switch (op) {
      case kStart:
        if (!ok) return Finish("the call did not start");
        if (opt_.mode == "echo") return Ready();
        phase_ = kOpening;
        request_open_.mutable_open()->set_model(opt_.model);
        return Exchange(request_open_);
      case kWrite:
      case kRead:
        failed_ |= !ok;
        if (--pending_ == 0) Exchanged();
        return;
      case kWritesDone:
        call_->Finish(&status_, Tag(kFinish));
        return;
      case kFinish:
        if (!status_.ok()) {
          Error("status " + std::to_string(status_.error_code()) + ": " + status_.error_message());
        } else if (!why_.empty()) {
          Error(why_);
        }
        phase_ = kDone;
        return run_->Done();
    }
  }

  // The window is set: the first message (from whichever thread released the barrier; this
  // session has no operation in flight).
  void Go() {
    phase_ = kRunning;
    SendNext();
  }

 private:
  enum Phase { kStarting, kOpening, kWaiting, kRunning, kEnding, kClosing, kDone };

  void* Tag(Op op) { return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(this) | op); }

  void Exchange(const StreamRequest& request) {
    bool own = false;
    grpc::Status ser = grpc::SerializationTraits<StreamRequest>::Serialize(request, &out_, &own);
    if (!ser.ok()) return Finish("cannot serialize a request: " + ser.error_message());
    Post();
  }

  void Post() {
    pending_ = 2;
    sent_ns_ = Now();
    call_->Write(out_, Tag(kWrite));
    call_->Read(&in_, Tag(kRead));
  }

  void Exchanged() {
    const int64_t done = Now();
    if (failed_) {
      if (phase_ == kOpening) return Finish("the stream ended before `opened`");
      return Finish(phase_ == kEnding ? "" : "the stream ended under a message in flight");
    }
    switch (phase_) {
      case kOpening:
        if (!Parse()) return;  // closing
        if (!reply_.has_opened()) {
          return Close("the open was answered with " + reply_.ShortDebugString());
        }
        if (sample_) sample_->version = reply_.opened().version();
        return Ready();
      case kRunning:
        if (!Check()) return;
        Record(sent_ns_, done);
        return SendNext();
      case kEnding:
        if (!Parse()) return;  // closing
        return Close(reply_.has_ended() ? "" : "`end` answered with " + reply_.ShortDebugString());
      default:
        return Finish("an exchange completed out of turn");
    }
  }

  void SendNext() {
    if (Now() >= run_->end_ns() || !run_->TakeMessage()) return End();
    if (opt_.mode == "echo") {
      out_ = echo_payload_;
      return Post();
    }
    ++seq_;
    auto* chunk = request_.mutable_chunk();
    chunk->set_seq(seq_);
    if (opt_.text) {
      static constexpr char kChars[] = "abcdefghijklmnopqrstuvwxyz";  // known to any alphabet
      std::string* text = chunk->mutable_input()->mutable_text();
      for (int i = 0; i < opt_.steps; ++i) (*text)[i] = kChars[NextRandom(&random_) % 26];
      return Exchange(request_);
    }
    auto* ids = chunk->mutable_input()->mutable_tokens()->mutable_ids();
    const uint64_t span = static_cast<uint64_t>(std::max(opt_.vocab - 1, 1));
    for (int i = 0; i < opt_.steps; ++i) {
      const int64_t id = 1 + static_cast<int64_t>(NextRandom(&random_) % span);  // [1, vocab)
      ids->Set(i, id);
      if (sample_) sample_->tokens.push_back(id);
    }
    Exchange(request_);
  }

  // The reply to the chunk in flight: its kind, seq and step count (the sample keeps its
  // probabilities); false (the call closing) for anything else.
  bool Check() {
    if (opt_.mode == "echo") {
      if (in_.Length() == opt_.reply_bytes) return true;
      Close("an echo reply of " + std::to_string(in_.Length()) + " bytes, not " +
            std::to_string(opt_.reply_bytes));
      return false;
    }
    if (!Parse()) return false;
    const auto& chunk = reply_.chunk();
    if (!reply_.has_chunk() || chunk.has_error() || chunk.seq() != seq_ ||
        chunk.total_steps() != seq_ * static_cast<uint64_t>(opt_.steps)) {
      Close("chunk " + std::to_string(seq_) + " answered with " + reply_.ShortDebugString());
      return false;
    }
    if (sample_) {
      sample_->classes = static_cast<size_t>(chunk.probabilities_size());
      sample_->probabilities.insert(sample_->probabilities.end(), chunk.probabilities().begin(),
                                    chunk.probabilities().end());
    }
    return true;
  }

  bool Parse() {
    grpc::Status parsed = grpc::SerializationTraits<StreamResponse>::Deserialize(&in_, &reply_);
    if (!parsed.ok()) Close("a reply that does not parse: " + parsed.error_message());
    return parsed.ok();
  }

  void Record(int64_t sent, int64_t done) {  // bench.load.Window.record
    const int64_t start = run_->start_ns(), end = run_->end_ns();
    if (start <= sent && done <= end) stats_->latencies_ns.push_back(done - sent);
    if (start <= done && done <= end) ++stats_->completed;
  }

  void End() {  // stream: `end`, its `ended`, then half-close; echo: half-close
    if (opt_.mode == "echo") return Close("");
    phase_ = kEnding;
    StreamRequest end;
    end.mutable_end();
    Exchange(end);
  }

  void Ready() {  // open: wait at the barrier for the window
    phase_ = kWaiting;
    arrived_ = true;
    run_->Arrive(this);
  }

  void Close(const std::string& why) {  // half-close, then the status
    if (why_.empty()) why_ = why;
    phase_ = kClosing;
    call_->WritesDone(Tag(kWritesDone));
    Leave();
  }

  void Finish(const std::string& why) {  // no operation in flight: the status now
    if (why_.empty()) why_ = why;
    phase_ = kClosing;
    call_->Finish(&status_, Tag(kFinish));
    Leave();
  }

  void Leave() {  // ended before the barrier: counted there all the same
    if (arrived_) return;
    arrived_ = true;
    run_->Arrive(nullptr);
  }

  void Error(const std::string& what) {
    run_->Error("session " + std::to_string(index_) + ": " + what);
  }

  Run* run_;
  const Options& opt_;
  const int index_;
  Stats* stats_;
  Sample* sample_;
  uint64_t random_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::ByteBuffer out_, in_, echo_payload_;
  grpc::Status status_;
  StreamRequest request_, request_open_;
  StreamResponse reply_;
  Phase phase_ = kStarting;
  int pending_ = 0;
  bool failed_ = false;
  bool arrived_ = false;  // at the barrier (open, or ended before it)
  uint64_t seq_ = 0;
  int64_t sent_ns_ = 0;
  std::string why_;
};

void Run::Arrive(Session* ready) {
  std::vector<Session*> go;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ready) waiting_.push_back(ready);
    if (++arrived_ < opt_.sessions) return;
    const int64_t now = Now();
    start_ns_.store(now + static_cast<int64_t>(opt_.warmup_s * 1e9), std::memory_order_release);
    end_ns_.store(now + static_cast<int64_t>((opt_.warmup_s + opt_.seconds) * 1e9),
                  std::memory_order_release);
    opened_ = true;
    released_ = static_cast<int>(waiting_.size());
    go.swap(waiting_);
  }
  cv_.notify_all();
  for (Session* session : go) session->Go();
}

void Run::Done() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++done_;
  }
  cv_.notify_all();
}

void Run::Error(const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (errors_++ == 0) first_error_ = what;
}

bool Run::WaitOpened(int64_t deadline_ns) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::nanoseconds(std::max<int64_t>(0, deadline_ns - Now())),
                      [&] { return opened_; }) &&
         released_ > 0;
}

bool Run::WaitDone(int64_t deadline_ns) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::nanoseconds(std::max<int64_t>(0, deadline_ns - Now())),
                      [&] { return done_ == opt_.sessions; });
}

void SleepUntil(int64_t when_ns) {
  const int64_t left = when_ns - Now();
  if (left > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(left));
}

void Event(const char* name) {
  std::printf("{\"event\": \"%s\"}\n", name);
  std::fflush(stdout);
}

std::string Json(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string Base64(const void* data, size_t size) {
  static const char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const auto* bytes = static_cast<const unsigned char*>(data);
  std::string out;
  out.reserve((size + 2) / 3 * 4);
  for (size_t i = 0; i < size; i += 3) {
    uint32_t n = bytes[i] << 16;
    if (i + 1 < size) n |= bytes[i + 1] << 8;
    if (i + 2 < size) n |= bytes[i + 2];
    out += kAlphabet[(n >> 18) & 63];
    out += kAlphabet[(n >> 12) & 63];
    out += i + 1 < size ? kAlphabet[(n >> 6) & 63] : '=';
    out += i + 2 < size ? kAlphabet[n & 63] : '=';
  }
  return out;
}

// numpy.percentile's default ("linear") in ms, as JSON (null: no latency was measured).
std::string Percentile(const std::vector<int64_t>& sorted, double q) {
  if (sorted.empty()) return "null";
  const double at = q * (sorted.size() - 1);
  const size_t lo = static_cast<size_t>(at);
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6f", 1e-6 * (sorted[lo] + (at - lo) * (sorted[hi] - sorted[lo])));
  return buf;
}

std::string SampleJson(const std::vector<Sample>& samples) {
  std::string out = "[";
  for (const Sample& s : samples) {
    if (out.size() > 1) out += ", ";
    out += "{\"session\": " + std::to_string(s.session) + ", \"version\": " +
           std::to_string(s.version) + ", \"classes\": " +
           std::to_string(s.classes) + ", \"tokens\": [";
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      if (i) out += ",";
      out += std::to_string(s.tokens[i]);
    }
    out += "], \"probabilities\": \"" +
           Base64(s.probabilities.data(), s.probabilities.size() * sizeof(float)) + "\"}";
  }
  return out + "]";
}

int Usage(const std::string& why) {
  std::fprintf(stderr,
               "lstm-serve-load: %s\nusage: lstm-serve-load --address HOST:PORT "
               "[--mode stream|echo] [--model NAME] [--sessions S] [--steps K] "
               "[--per-channel N] [--warmup S] [--seconds S] [--vocab V] [--seed N] "
               "[--sample N] [--threads N] [--max-seconds S] [--max-messages N] "
               "[--request-bytes N] [--reply-bytes N] [--own-connections 0|1] "
               "[--text 0|1]\n",
               why.c_str());
  return 2;
}

int Parse(int argc, char** argv, Options* opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return Usage("missing value for " + arg);
    const std::string value = argv[++i];
    const char* v = value.c_str();
    if (arg == "--address") opt->address = value;
    else if (arg == "--mode") opt->mode = value;
    else if (arg == "--model") opt->model = value;
    else if (arg == "--sessions") opt->sessions = std::atoi(v);
    else if (arg == "--steps") opt->steps = std::atoi(v);
    else if (arg == "--per-channel") opt->per_channel = std::atoi(v);
    else if (arg == "--warmup") opt->warmup_s = std::atof(v);
    else if (arg == "--seconds") opt->seconds = std::atof(v);
    else if (arg == "--vocab") opt->vocab = std::atoi(v);
    else if (arg == "--seed") opt->seed = std::strtoull(v, nullptr, 10);
    else if (arg == "--sample") opt->sample = std::atoi(v);
    else if (arg == "--threads") opt->threads = std::atoi(v);
    else if (arg == "--max-seconds") opt->max_seconds = std::atof(v);
    else if (arg == "--max-messages") opt->max_messages = std::strtoull(v, nullptr, 10);
    else if (arg == "--request-bytes") opt->request_bytes = std::strtoull(v, nullptr, 10);
    else if (arg == "--reply-bytes") opt->reply_bytes = std::strtoull(v, nullptr, 10);
    else if (arg == "--own-connections") opt->own_connections = std::atoi(v) != 0;
    else if (arg == "--text") opt->text = std::atoi(v) != 0;
    else return Usage("unknown flag " + arg);
  }
  if (opt->address.empty()) return Usage("--address is required");
  if (opt->mode != "stream" && opt->mode != "echo") return Usage("--mode is stream or echo");
  if (opt->sessions < 1 || opt->sessions > 100'000) return Usage("--sessions: 1 to 100000");
  if (opt->steps < 1 || opt->steps > 100'000) return Usage("--steps: 1 to 100000");
  if (opt->per_channel < 1 || opt->threads < 1 || opt->threads > 64 || opt->sample < 0) {
    return Usage("--per-channel >= 1, --threads 1 to 64, --sample >= 0");
  }
  if (opt->text && opt->sample != 0) return Usage("--text 1 takes --sample 0 (no offline check)");
  if (opt->vocab < 2) return Usage("--vocab >= 2 (token ids are drawn from [1, vocab))");
  if (!(opt->warmup_s >= 0) || !(opt->seconds > 0) || !(opt->max_seconds > 0) ||
      opt->warmup_s + opt->seconds >= opt->max_seconds) {
    return Usage("--warmup >= 0, --seconds > 0, warmup + seconds < --max-seconds");
  }
  return 0;
}

std::shared_ptr<grpc::Channel> Connect(const std::string& address, int index, bool own) {
  grpc::ChannelArguments args;
  if (own) {  // otherwise channels of equal arguments share one connection
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("lstm_serve_load.channel", index);
  }
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (int bad = Parse(argc, argv, &opt)) return bad;
  const int64_t began = Now();
  const int64_t hard_end = began + static_cast<int64_t>((opt.max_seconds + 5) * 1e9);
  Run run(opt);

  const int channel_count = std::max(1, std::min(8, opt.sessions / opt.per_channel));
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < channel_count; ++i) {
    channels.push_back(Connect(opt.address, i, opt.own_connections));
    stubs.push_back(std::make_unique<grpc::GenericStub>(channels.back()));
  }
  const int threads = std::min(opt.threads, opt.sessions);
  std::vector<std::unique_ptr<grpc::CompletionQueue>> queues;
  std::vector<Stats> stats(threads);
  for (int t = 0; t < threads; ++t) queues.push_back(std::make_unique<grpc::CompletionQueue>());

  const int sampled = std::min(opt.sample, opt.mode == "stream" ? opt.sessions : 0);
  std::vector<Sample> samples(sampled);
  std::vector<std::unique_ptr<Session>> sessions;
  int next_sample = 0;
  for (int i = 0; i < opt.sessions; ++i) {
    Sample* sample = nullptr;  // sessions 0, S/n, 2S/n, ...
    if (next_sample < sampled &&
        static_cast<int64_t>(next_sample) * opt.sessions / sampled == i) {
      sample = &samples[next_sample++];
      sample->session = i;
    }
    sessions.push_back(std::make_unique<Session>(&run, i, stubs[i % channel_count].get(),
                                                 queues[i % threads].get(), &stats[i % threads],
                                                 sample));
  }
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([cq = queues[t].get()] {
      void* tag = nullptr;
      bool ok = false;
      while (cq->Next(&tag, &ok)) {
        const auto bits = reinterpret_cast<uintptr_t>(tag);
        reinterpret_cast<Session*>(bits & ~uintptr_t{7})->OnEvent(static_cast<Op>(bits & 7), ok);
      }
    });
  }

  double cpu_start = NAN, cpu_end = NAN;
  const int64_t bound = began + static_cast<int64_t>(opt.max_seconds * 1e9);
  if (run.WaitOpened(bound)) {
    SleepUntil(run.start_ns());
    cpu_start = CpuSeconds();
    Event("start");
    SleepUntil(run.end_ns());
    cpu_end = CpuSeconds();
    Event("end");
  }
  bool finished = run.WaitDone(bound);
  if (!finished) {
    run.Error("hard bound: sessions still running after --max-seconds; cancelled");
    for (auto& session : sessions) session->Cancel();
    finished = run.WaitDone(hard_end);
  }

  std::vector<int64_t> latencies;
  uint64_t completed = 0;
  for (const Stats& s : stats) {
    completed += s.completed;
    latencies.insert(latencies.end(), s.latencies_ns.begin(), s.latencies_ns.end());
  }
  std::sort(latencies.begin(), latencies.end());
  const double window_s = 1e-9 * (run.end_ns() - run.start_ns());
  std::printf(
      "{\"event\": \"result\", \"mode\": \"%s\", \"sessions\": %d, \"steps\": %d, "
      "\"channels\": %d, \"threads\": %d, \"completed\": %llu, \"window_s\": %.6f, "
      "\"sent\": %llu, \"latencies\": %zu, \"p50_ms\": %s, \"p95_ms\": %s, "
      "\"p99_ms\": %s, \"errors\": %llu, \"first_error\": %s, \"cpu_s\": %.6f, "
      "\"cpu_total_s\": %.6f, \"sample\": %s}\n",
      opt.mode.c_str(), opt.sessions, opt.steps, channel_count, threads,
      static_cast<unsigned long long>(completed), std::isfinite(cpu_start) ? window_s : 0.0,
      static_cast<unsigned long long>(run.sent()), latencies.size(), Percentile(latencies, 0.5).c_str(),
      Percentile(latencies, 0.95).c_str(), Percentile(latencies, 0.99).c_str(),
      static_cast<unsigned long long>(run.errors()), Json(run.first_error()).c_str(),
      std::isfinite(cpu_start) ? cpu_end - cpu_start : 0.0, CpuSeconds(),
      finished ? SampleJson(samples).c_str() : "[]");
  std::fflush(stdout);
  if (!finished) std::_Exit(1);  // calls still in flight: no orderly teardown to wait for
  for (auto& cq : queues) cq->Shutdown();
  for (auto& worker : workers) worker.join();
  return run.errors() ? 1 : 0;
}
