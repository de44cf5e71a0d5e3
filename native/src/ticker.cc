// Ticker: every stream's pending message in one Tick to the Python server (a tick takes
// whatever arrived while the previous ones ran), a few ticks in flight, over a callback-API
// bidi call: no thread of its own.
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

}  // namespace

// The NativeFront.Ticks call: one tick written at a time, replies read as they come.
class Link : public grpc::ClientBidiReactor<Tick, TickReply> {
 public:
  explicit Link(Ticker* ticker) : ticker_(ticker) {}
  // Outside the ticker's lock: gRPC may run a reaction (a failed read: the server is down)
  // inline at the end of StartCall, and every reaction takes that lock.
  void Start(lstmserve::v1::NativeFront::Stub* stub) {
    stub->async()->Ticks(&ctx_, this);
    StartRead(&reply_);
    AddHold();  // writes come and go: held until the ticker gives the call up (ReadFailed)
    StartCall();
  }
  void Write(Tick tick) {
    out_ = std::move(tick);
    StartWrite(&out_);
  }
  void Cancel() { ctx_.TryCancel(); }
  void Release() { RemoveHold(); }  // no write will follow: OnDone may come
  void OnWriteDone(bool ok) override {
    if (!ok) Cancel();
    ticker_->Written(this);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Cancel();
      ticker_->ReadFailed(this);
      return;
    }
    ticker_->Answered(reply_);
    StartRead(&reply_);
  }
  void OnDone(const grpc::Status& status) override {
    ticker_->Lost(this);
    Unref();
  }
  // Kept alive by whoever uses it outside the ticker's lock (Ticker::Stop); gRPC's own use
  // ends with OnDone.
  void Ref() { refs_.fetch_add(1); }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

 private:
  std::atomic<int> refs_{1};
  Ticker* ticker_;
  grpc::ClientContext ctx_;
  Tick out_;
  TickReply reply_;
};

Ticker::Ticker(std::shared_ptr<grpc::Channel> channel, size_t max_tick_bytes, int max_in_flight)
    : stub_(lstmserve::v1::NativeFront::NewStub(channel)),
      max_tick_bytes_(max_tick_bytes),
      max_in_flight_(max_in_flight < 1 ? 1 : max_in_flight) {}

void Ticker::Stop() {
  Link* link;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    link = link_;
    if (link != nullptr) link->Ref();  // OnDone may come as soon as the lock is released
  }
  if (link == nullptr) return;
  link->Cancel();  // outside the lock: its reactions may run inline here (they take it)
  link->Unref();
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait_for(lock, std::chrono::seconds(5), [this] { return link_ == nullptr; });
}

void Ticker::Register(const std::shared_ptr<NativeStream>& stream) {
  std::lock_guard<std::mutex> lock(mu_);
  live_[stream->id()] = stream;
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

// The tick's entries: the pending messages of streams with nothing in flight, in arrival order,
// up to max_tick_bytes_; the closes of streams with nothing in flight. False if none.
bool Ticker::TakeLocked(Tick* tick, Streams* who) {
  size_t bytes = 0;
  std::deque<std::pair<std::shared_ptr<NativeStream>, TickEntry>> kept;
  while (!pending_.empty()) {
    auto item = std::move(pending_.front());
    pending_.pop_front();
    uint64_t id = item.second.stream();
    size_t size = item.second.ByteSizeLong();
    if (busy_.count(id) || (!who->empty() && bytes + size > max_tick_bytes_)) {
      kept.push_back(std::move(item));
      continue;
    }
    if (!item.first->Taken()) continue;  // ended meanwhile: the message is dropped
    bytes += size;
    busy_[id] = 1;
    tick->mutable_entries()->Add(std::move(item.second));
    who->push_back(std::move(item.first));
  }
  pending_ = std::move(kept);
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
  return tick->entries_size() > 0 || tick->closed_size() > 0;
}

void Ticker::Pump() {
  Tick tick;
  Link* link;
  Link* fresh = nullptr;
  Streams who;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || writing_ || dying_ || in_flight_.size() >= max_in_flight_) return;
    if (!TakeLocked(&tick, &who)) return;
    if (link_ == nullptr) fresh = link_ = new Link(this);
    uint64_t id = next_tick_++;
    tick.set_id(id);
    entries_ += tick.entries_size();
    in_flight_[id] = who;
    writing_ = true;
    link = link_;
  }
  // Outside the lock, as gRPC may run reactions inline at the end of these calls.
  if (fresh != nullptr) fresh->Start(stub_.get());
  link->Write(std::move(tick));
  for (auto& stream : who) stream->ReadAhead();
}

void Ticker::Written(Link* link) {
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (dying_ && !released_) release = released_ = true;
  }
  if (release) {
    link->Release();
  } else {
    Pump();
  }
}

// The link's reads ended (the call is over): once no write is in flight, the hold that kept the
// call open for writes is released, and OnDone (Lost) follows.
void Ticker::ReadFailed(Link* link) {
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dying_ = true;
    if (!writing_ && !released_) release = released_ = true;
  }
  if (release) link->Release();
}

void Ticker::Answered(const TickReply& reply) {
  if (reply.tick() == 0) {  // a push: a draining server's last message on idle streams
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

// The link ended: every stream the Python server knew ends; the next message opens a new link.
void Ticker::Lost(Link* link) {
  std::vector<Streams> lost;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (link != link_) return;
    for (auto& [id, streams] : in_flight_) lost.push_back(std::move(streams));
    in_flight_.clear();
    busy_.clear();
    closed_.clear();  // the next link knows none of them
    link_ = nullptr;
    writing_ = dying_ = released_ = false;
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
