// Ticker: every stream's pending message in one Tick to the Python server, one tick at a time
// (a tick takes whatever arrived while the previous one ran).
#include <chrono>
#include <cstdio>

#include "front.h"

namespace front {

Ticker::Ticker(std::shared_ptr<grpc::Channel> channel, size_t max_tick_bytes)
    : stub_(lstmserve::v1::NativeFront::NewStub(channel)), max_tick_bytes_(max_tick_bytes) {}

Ticker::~Ticker() { Stop(); }

void Ticker::Start() { thread_ = std::thread([this] { Run(); }); }

void Ticker::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (link_ctx_) link_ctx_->TryCancel();
  if (thread_.joinable()) thread_.join();
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
  cv_.notify_one();
}

void Ticker::Closed(uint64_t id, bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(id);
    closed_.emplace_back(id, ok);
  }
  cv_.notify_one();
}

void Ticker::Run() {
  std::vector<std::pair<std::shared_ptr<NativeStream>, TickEntry>> batch;
  std::vector<std::shared_ptr<NativeStream>> who;
  while (true) {
    Tick tick;
    batch.clear();
    who.clear();
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !pending_.empty() || !closed_.empty(); });
      if (stop_) break;
      size_t bytes = 0, take = 0;
      for (; take < pending_.size(); ++take) {  // at least one; then up to max_tick_bytes_
        bytes += pending_[take].second.ByteSizeLong();
        if (take > 0 && bytes > max_tick_bytes_) break;
      }
      batch.assign(std::make_move_iterator(pending_.begin()),
                   std::make_move_iterator(pending_.begin() + take));
      pending_.erase(pending_.begin(), pending_.begin() + take);
      for (const auto& [id, ok] : closed_) {
        tick.add_closed(id);
        tick.add_closed_ok(ok);
      }
      closed_.clear();
    }
    for (auto& [stream, entry] : batch) {
      if (!stream->Taken()) continue;  // ended meanwhile: the message is dropped
      tick.mutable_entries()->Add(std::move(entry));
      who.push_back(stream);
    }
    if (tick.entries_size() == 0 && tick.closed_size() == 0) continue;
    TickReply reply;
    if (!Exchange(tick, &reply) || reply.outcomes_size() != tick.entries_size()) {
      Disconnect();
      grpc::Status lost(grpc::StatusCode::UNAVAILABLE,
                        "the server behind the native front is unavailable: resume the session "
                        "(or restore its snapshot) on another replica");
      for (auto& stream : who) stream->Fail(lost);
      FailAll(lost);
      continue;
    }
    ++ticks_;
    entries_ += tick.entries_size();
    for (int i = 0; i < reply.outcomes_size(); ++i) who[i]->Answer(reply.outcomes(i));
  }
  Disconnect();
}

bool Ticker::Exchange(const Tick& tick, TickReply* reply) {
  if (!link_) {
    link_ctx_ = std::make_unique<grpc::ClientContext>();
    link_ = stub_->Ticks(link_ctx_.get());
  }
  return link_->Write(tick) && link_->Read(reply);
}

void Ticker::Disconnect() {
  if (!link_) return;
  link_ctx_->TryCancel();
  link_->Finish();
  link_.reset();
  link_ctx_.reset();
}

// The Python server forgot every stream of the broken link: those it knew end.
void Ticker::FailAll(const grpc::Status& status) {
  std::vector<std::shared_ptr<NativeStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, weak] : live_) {
      if (auto stream = weak.lock()) streams.push_back(std::move(stream));
    }
    closed_.clear();  // the new link knows none of them
  }
  for (auto& stream : streams) {
    if (stream->Known()) stream->Fail(status);
  }
}

}  // namespace front
