// Ticker: every stream's pending message in one Tick to the Python server (a tick takes
// whatever arrived while the previous ones ran), a few ticks in flight, each a length-prefixed
// frame on a Unix socket (service/native_front.py serves it).
#include <errno.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "front.h"

namespace front {

namespace {

const grpc::Status& LostStatus() {
  static const grpc::Status lost(grpc::StatusCode::UNAVAILABLE,
                                 "the server behind the native front is unavailable: resume the "
                                 "session (or restore its snapshot) on another replica");
  return lost;
}

// How long the keeper waits before connecting again after a link ended; doubled after each
// connect that fails (no server there), up to kReconnectMax, back to kReconnect once linked.
constexpr std::chrono::milliseconds kReconnect(100);
constexpr std::chrono::milliseconds kReconnectMax(1000);

// A reply larger than this ends the link (the Python server never writes one: its replies are a
// tick's answers, each tick within --max-tick-bytes).
constexpr uint32_t kMaxReplyBytes = 1u << 30;

// Moves `size` bytes with `op` (a send or a recv of up to n bytes at p), through short counts
// and interrupted calls; false once the socket fails or (recv) the server closed it.
template <typename Op>
bool Whole(char* data, size_t size, Op op) {
  while (size > 0) {
    ssize_t n = op(data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool WriteAll(int fd, char* data, size_t size) {
  return Whole(data, size, [fd](char* p, size_t n) { return ::send(fd, p, n, MSG_NOSIGNAL); });
}

bool ReadAll(int fd, char* data, size_t size) {
  return Whole(data, size, [fd](char* p, size_t n) { return ::recv(fd, p, n, 0); });
}

}  // namespace

// One connection to the Python server's ticks socket: frames written by whichever thread pumps
// (one at a time: Ticker::writing_), replies read by a thread of its own until the connection
// ends, when it reports the link lost and exits.
class Link {
 public:
  explicit Link(int fd) : fd_(fd) {}
  ~Link() { ::close(fd_); }

  static std::shared_ptr<Link> Connect(const std::string& path) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    if (path.size() >= sizeof(address.sun_path)) return nullptr;
    std::memcpy(address.sun_path, path.data(), path.size());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return nullptr;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      ::close(fd);
      return nullptr;  // not listening (restarting, or gone): the tick's streams fail over
    }
    return std::make_shared<Link>(fd);
  }

  void StartReading(Ticker* ticker, std::shared_ptr<Link> self) {
    std::thread([ticker, self = std::move(self)] { self->Read(ticker); }).detach();
  }

  bool Write(const Tick& tick) {
    const uint32_t size = static_cast<uint32_t>(tick.ByteSizeLong());
    frame_.resize(4 + size);
    for (int i = 0; i < 4; ++i) frame_[i] = static_cast<char>((size >> (8 * i)) & 0xff);
    if (!tick.SerializeToArray(frame_.data() + 4, static_cast<int>(size))) return false;
    return WriteAll(fd_, frame_.data(), frame_.size());
  }

  // Ends the connection: a blocked write returns, the reader sees the end.
  void Shutdown() { ::shutdown(fd_, SHUT_RDWR); }

 private:
  void Read(Ticker* ticker) {
    std::string body;
    TickReply reply;
    for (;;) {
      unsigned char header[4];
      if (!ReadAll(fd_, reinterpret_cast<char*>(header), 4)) break;
      const uint32_t size = header[0] | header[1] << 8 | header[2] << 16 |
                            static_cast<uint32_t>(header[3]) << 24;
      if (size > kMaxReplyBytes) break;
      body.resize(size);
      if (!ReadAll(fd_, body.data(), size)) break;
      if (!reply.ParseFromString(body)) break;
      ticker->Answered(reply);
    }
    Shutdown();
    ticker->Lost(this);
  }

  const int fd_;
  std::string frame_;  // the tick being written (by one thread at a time)
};

Ticker::Ticker(std::string socket_path, size_t max_tick_bytes, int max_in_flight)
    : socket_path_(std::move(socket_path)),
      max_tick_bytes_(max_tick_bytes),
      max_in_flight_(max_in_flight < 1 ? 1 : max_in_flight) {}

Ticker::~Ticker() {
  if (keeper_.joinable()) Stop();
}

void Ticker::Start() { keeper_ = std::thread([this] { Keep(); }); }

// A link open while no message needs one, so that a draining server's notice (TickReply.drain)
// reaches the calls that have sent nothing yet: connected at once, and again kReconnect after
// a link ends, then (the server not there yet, restarting, or gone) after 0.2, 0.4, 0.8 s and
// every kReconnectMax until a connect succeeds (here, or Pump's for a message), until Stop.
void Ticker::Keep() {
  std::unique_lock<std::mutex> lock(mu_);
  auto delay = kReconnect;
  while (!stop_) {
    if (link_ == nullptr) {
      link_ = Link::Connect(socket_path_);
      if (link_ != nullptr) link_->StartReading(this, link_);  // its reader locks mu_ later
    }
    if (link_ != nullptr) delay = kReconnect;  // linked: the next loss retries soon
    idle_.wait(lock, [this] { return stop_ || link_ == nullptr; });
    idle_.wait_for(lock, delay, [this] { return stop_; });
    delay = std::min(delay * 2, kReconnectMax);
  }
}

void Ticker::Stop() {
  std::shared_ptr<Link> link;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    link = link_;
  }
  idle_.notify_all();
  if (keeper_.joinable()) keeper_.join();
  if (link == nullptr) return;
  link->Shutdown();  // its reader reports it lost (and fails the streams it held)
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait_for(lock, std::chrono::seconds(5), [this] { return link_ == nullptr; });
}

std::optional<DrainNotice> Ticker::Register(const std::shared_ptr<NativeStream>& stream) {
  std::lock_guard<std::mutex> lock(mu_);
  live_[stream->id()] = stream;
  return drain_;
}

void Ticker::Submit(std::shared_ptr<NativeStream> stream, TickEntry entry) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.emplace_back(std::move(stream), std::move(entry));
  }
  Pump();
}

void Ticker::Closed(uint64_t id, bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(id);
    closed_.emplace_back(id, ok);
  }
  Pump();
}

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the tick's columns are little-endian");
static_assert(sizeof(float) == 4, "frame values are float32");

template <typename T>
void Append(std::string* column, T value) {
  column->append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// How a message travels: an entry, or packed as columns (a plain chunk on a stream the server
// already knows: token ids, feature frames in the flat form, or text). StreamMulti's are
// entries.
enum class Packing { kEntry, kTokens, kFrames, kText };

Packing PackingOf(const TickEntry& entry) {
  if (entry.first() || entry.malformed() || entry.multi_stream() || !entry.request().has_chunk()) {
    return Packing::kEntry;
  }
  const auto& input = entry.request().chunk().input();
  if (input.has_tokens()) return Packing::kTokens;
  if (input.has_frames() && input.frames().frames_size() == 0) return Packing::kFrames;
  if (input.has_text()) return Packing::kText;  // valid UTF-8: else it did not parse (malformed)
  return Packing::kEntry;
}

}  // namespace

// The tick's messages: the pending messages of streams with nothing in flight, in arrival order,
// up to max_tick_bytes_ (entries, then the packed chunks: `who` in the same order); the closes
// of streams with nothing in flight. False if none.
bool Ticker::TakeLocked(Tick* tick, Streams* who) {
  size_t bytes = 0;
  std::deque<std::pair<std::shared_ptr<NativeStream>, TickEntry>> kept;
  Streams tokens_who, frames_who, text_who;
  uint32_t token_offset = 0, frame_offset = 0, text_offset = 0;
  while (!pending_.empty()) {
    auto item = std::move(pending_.front());
    pending_.pop_front();
    uint64_t id = item.second.stream();
    size_t size = item.second.ByteSizeLong();
    if (busy_.count(id) || (bytes > 0 && bytes + size > max_tick_bytes_)) {
      kept.push_back(std::move(item));
      continue;
    }
    if (!item.first->Taken()) continue;  // ended meanwhile: the message is dropped
    bytes += size;
    busy_[id] = 1;
    const auto& chunk = item.second.request().chunk();
    switch (PackingOf(item.second)) {
      case Packing::kTokens: {
        const auto& ids = chunk.input().tokens().ids();
        if (tokens_who.empty()) Append<uint32_t>(tick->mutable_chunk_offsets(), 0);
        Append<uint64_t>(tick->mutable_chunk_streams(), id);
        Append<uint64_t>(tick->mutable_chunk_seqs(), chunk.seq());
        tick->mutable_chunk_tokens()->append(reinterpret_cast<const char*>(ids.data()),
                                             ids.size() * sizeof(int64_t));
        token_offset += static_cast<uint32_t>(ids.size());
        Append<uint32_t>(tick->mutable_chunk_offsets(), token_offset);
        tokens_who.push_back(std::move(item.first));
        break;
      }
      case Packing::kFrames: {
        const auto& frames = chunk.input().frames();
        const auto& values = frames.values();
        if (frames_who.empty()) Append<uint32_t>(tick->mutable_frame_offsets(), 0);
        Append<uint64_t>(tick->mutable_frame_streams(), id);
        Append<uint64_t>(tick->mutable_frame_seqs(), chunk.seq());
        Append<uint32_t>(tick->mutable_frame_counts(), frames.frame_count());
        tick->mutable_frame_values()->append(reinterpret_cast<const char*>(values.data()),
                                             values.size() * sizeof(float));
        frame_offset += static_cast<uint32_t>(values.size());
        Append<uint32_t>(tick->mutable_frame_offsets(), frame_offset);
        frames_who.push_back(std::move(item.first));
        break;
      }
      case Packing::kText: {
        const std::string& text = chunk.input().text();
        if (text_who.empty()) Append<uint32_t>(tick->mutable_text_offsets(), 0);
        Append<uint64_t>(tick->mutable_text_streams(), id);
        Append<uint64_t>(tick->mutable_text_seqs(), chunk.seq());
        tick->mutable_text_bytes()->append(text);
        text_offset += static_cast<uint32_t>(text.size());
        Append<uint32_t>(tick->mutable_text_offsets(), text_offset);
        text_who.push_back(std::move(item.first));
        break;
      }
      case Packing::kEntry:
        tick->mutable_entries()->Add(std::move(item.second));
        who->push_back(std::move(item.first));
        break;
    }
  }
  pending_ = std::move(kept);
  for (auto& stream : tokens_who) who->push_back(std::move(stream));
  for (auto& stream : frames_who) who->push_back(std::move(stream));
  for (auto& stream : text_who) who->push_back(std::move(stream));
  std::vector<std::pair<uint64_t, bool>> later;
  for (const auto& [id, ok] : closed_) {
    if (busy_.count(id)) {
      later.emplace_back(id, ok);
    } else {
      tick->add_closed(id);
      tick->add_closed_ok(ok);
    }
  }
  closed_ = std::move(later);
  return !who->empty() || tick->closed_size() > 0;
}

void Ticker::Pump() {
  for (;;) {
    Tick tick;
    Streams who;
    std::shared_ptr<Link> link;
    bool fresh = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_ || writing_ || in_flight_.size() >= max_in_flight_) return;
      if (!TakeLocked(&tick, &who)) return;
      if (link_ == nullptr) {
        link_ = Link::Connect(socket_path_);
        fresh = link_ != nullptr;
      }
      if (link_ == nullptr) {  // the server is not there: these streams fail over
        for (auto& stream : who) busy_.erase(stream->id());
        closed_.clear();  // no server knows them
      } else {
        uint64_t id = next_tick_++;
        tick.set_id(id);
        entries_ += who.size();
        in_flight_[id] = who;
        writing_ = true;
        link = link_;
      }
    }
    if (link == nullptr) {
      for (auto& stream : who) stream->Fail(LostStatus());
      continue;
    }
    if (fresh) link->StartReading(this, link);
    bool ok = link->Write(tick);
    // Outside the lock: gRPC may run a read's reaction (OnReadDone -> Submit) inline.
    for (auto& stream : who) stream->ReadAhead();
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
    }
    if (!ok) link->Shutdown();  // its reader reports it lost
  }
}

void Ticker::Answered(const TickReply& reply) {
  if (reply.tick() == 0) {  // a push: a draining server's last message on idle streams
    if (reply.has_drain()) Drained(reply);
    for (const auto& outcome : reply.outcomes()) {
      std::shared_ptr<NativeStream> stream;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto found = live_.find(outcome.stream());
        if (found != live_.end()) stream = found->second.lock();
      }
      if (stream) stream->Push(outcome);
    }
    return;
  }
  Streams who;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = in_flight_.find(reply.tick());
    if (found == in_flight_.end()) return;
    who = std::move(found->second);
    in_flight_.erase(found);
    for (auto& stream : who) busy_.erase(stream->id());
  }
  if (!Dispatch(reply, who)) {
    for (auto& stream : who) stream->Fail(LostStatus());
  }
  ++ticks_;
  Pump();
}

namespace {

// A packed little-endian column of n values (copied: the bytes need not be aligned).
template <typename T>
bool Column(const std::string& bytes, size_t n, std::vector<T>* out) {
  if (bytes.size() != n * sizeof(T)) return false;
  out->resize(n);
  if (n) std::memcpy(out->data(), bytes.data(), bytes.size());
  return true;
}

}  // namespace

// Each entry's answer: packed (from the columns) or its outcome; false if the reply does not
// fit the tick (nothing answered then).
bool Ticker::Dispatch(const TickReply& reply, const Streams& who) {
  const size_t n = who.size();
  if (reply.packed().empty()) {
    if (static_cast<size_t>(reply.outcomes_size()) != n) return false;
    for (size_t i = 0; i < n; ++i) who[i]->Answer(reply.outcomes(i));
    return true;
  }
  std::vector<uint8_t> packed, flags;
  std::vector<uint64_t> seqs, totals;
  std::vector<uint32_t> steps, held, rewound;
  if (!Column(reply.packed(), n, &packed) || !Column(reply.flags(), n, &flags) ||
      !Column(reply.seqs(), n, &seqs) || !Column(reply.total_steps(), n, &totals) ||
      !Column(reply.steps(), n, &steps) || !Column(reply.held_characters(), n, &held) ||
      !Column(reply.rewound_steps(), n, &rewound)) {
    return false;
  }
  size_t unpacked = 0, floats = 0;
  std::vector<size_t> classes(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (!packed[i]) {
      ++unpacked;
    } else if (flags[i] & 2) {
      classes[i] = who[i]->Classes();
      floats += classes[i];
    }
  }
  if (unpacked != static_cast<size_t>(reply.outcomes_size()) ||
      reply.probabilities().size() != floats * sizeof(float)) {
    return false;
  }
  std::vector<float> values(floats);
  if (floats) std::memcpy(values.data(), reply.probabilities().data(), floats * sizeof(float));
  const float* probs = values.data();
  int next = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!packed[i]) {
      who[i]->Answer(reply.outcomes(next++));
      continue;
    }
    Packed p;
    p.seq = seqs[i];
    p.total_steps = totals[i];
    p.steps = steps[i];
    p.held_characters = held[i];
    p.rewound_steps = rewound[i];
    p.duplicate = flags[i] & 1;
    if (flags[i] & 2) {
      p.probabilities = probs;
      probs += classes[i];
    }
    who[i]->AnswerPacked(p);
  }
  return true;
}

// The server drains: every call it does not know ends (NativeStream::Drain), now and as they
// open, while this link lasts.
void Ticker::Drained(const TickReply& reply) {
  DrainNotice notice{
      grpc::Status(static_cast<grpc::StatusCode>(reply.drain().code()), reply.drain().message()),
      std::chrono::milliseconds(reply.drain_first_message_ms())};
  std::vector<std::shared_ptr<NativeStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    drain_ = notice;
    for (auto& [id, weak] : live_) {
      if (auto stream = weak.lock()) streams.push_back(std::move(stream));
    }
  }
  for (auto& stream : streams) stream->Drain(notice);
}

// The link ended: every stream the Python server knew ends; the next message (or the keeper,
// kReconnect later) opens a new link.
void Ticker::Lost(Link* link) {
  std::vector<Streams> lost;
  std::shared_ptr<Link> keep;  // released after the lock
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (link != link_.get()) return;
    for (auto& [id, streams] : in_flight_) lost.push_back(std::move(streams));
    in_flight_.clear();
    busy_.clear();
    closed_.clear();  // the next link knows none of them
    drain_.reset();   // its server's: the next one may serve
    keep = std::move(link_);
  }
  idle_.notify_all();
  FailAll(LostStatus(), lost);
  Pump();
}

void Ticker::FailAll(const grpc::Status& status, const std::vector<Streams>& in_flight) {
  for (const auto& streams : in_flight) {
    for (const auto& stream : streams) stream->Fail(status);
  }
  std::vector<std::shared_ptr<NativeStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, weak] : live_) {
      if (auto stream = weak.lock()) streams.push_back(std::move(stream));
    }
  }
  for (auto& stream : streams) {
    if (stream->Known()) stream->Fail(status);
  }
}

}  // namespace front
