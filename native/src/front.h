// The native front: Stream terminated here and batched into ticks for the Python server;
// every other method passed through to it. See docs/NATIVE_FRONT.md.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lstmserve/v1/lstm_serve.pb.h"
#include "lstmserve/v1/native_front.grpc.pb.h"

namespace front {

using lstmserve::v1::Tick;
using lstmserve::v1::TickEntry;
using lstmserve::v1::TickOutcome;
using lstmserve::v1::TickReply;

inline constexpr char kStreamMethod[] = "/lstmserve.v1.LstmServe/Stream";

class Ticker;

// One client's Stream call: reads one message at a time (one read ahead of the answers), hands
// each to the ticker, writes the answers in order, ends as the Python server says.
class NativeStream : public grpc::ServerGenericBidiReactor {
 public:
  NativeStream(grpc::GenericCallbackServerContext* ctx, Ticker* ticker, uint64_t id);
  void Begin(std::shared_ptr<NativeStream> self);
  uint64_t id() const { return id_; }

  // From the ticker's thread.
  bool Taken();                          // its message went into a tick: read the next one
  void Answer(const TickOutcome& outcome);
  void Fail(const grpc::Status& status);  // the link to the Python server broke
  bool Known();                           // the Python server holds state for it

  // Reactions (gRPC's threads).
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;
  void OnCancel() override {}

 private:
  void EndLocked(const grpc::Status& status);
  void PumpLocked();

  grpc::GenericCallbackServerContext* ctx_;
  Ticker* ticker_;
  const uint64_t id_;
  std::recursive_mutex mu_;  // a reaction may run inline in a Start* call
  grpc::ByteBuffer in_;
  std::deque<grpc::ByteBuffer> out_;
  bool writing_ = false;
  bool eof_ = false;       // the client half-closed
  bool ended_ = false;     // the stream's status is decided (status_)
  bool finished_ = false;  // Finish called
  bool done_ = false;      // OnDone ran: no reactor call any more
  bool reading_ = false;
  bool sent_ = false;      // a message went to the Python server
  int unanswered_ = 0;
  grpc::Status status_;
  std::string authorization_;
  bool has_authorization_ = false;
  std::shared_ptr<NativeStream> self_;
};

// Batches every stream's pending message into one Tick, one at a time, over one long-lived
// NativeFront.Ticks call to the Python server on its Unix socket.
class Ticker {
 public:
  Ticker(std::shared_ptr<grpc::Channel> channel, size_t max_tick_bytes);
  ~Ticker();
  void Start();
  void Stop();
  void Register(const std::shared_ptr<NativeStream>& stream);
  void Submit(std::shared_ptr<NativeStream> stream, TickEntry entry);
  void Closed(uint64_t id, bool ok);
  uint64_t NextId() { return next_id_.fetch_add(1); }
  // Counters for the log line on exit.
  uint64_t ticks() const { return ticks_; }
  uint64_t entries() const { return entries_; }

 private:
  void Run();
  bool Exchange(const Tick& tick, TickReply* reply);
  void Disconnect();
  void FailAll(const grpc::Status& status);

  std::unique_ptr<lstmserve::v1::NativeFront::Stub> stub_;
  const size_t max_tick_bytes_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<std::shared_ptr<NativeStream>, TickEntry>> pending_;
  std::vector<std::pair<uint64_t, bool>> closed_;
  std::unordered_map<uint64_t, std::weak_ptr<NativeStream>> live_;
  bool stop_ = false;
  std::thread thread_;
  std::unique_ptr<grpc::ClientContext> link_ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<Tick, TickReply>> link_;
  std::atomic<uint64_t> next_id_{1};
  uint64_t ticks_ = 0, entries_ = 0;
};

// Any other method: forwarded as bytes to the Python server (metadata, deadline and status
// included), one message in flight each way.
grpc::ServerGenericBidiReactor* StartProxy(grpc::GenericCallbackServerContext* ctx,
                                           grpc::GenericStub* upstream);

class FrontService : public grpc::CallbackGenericService {
 public:
  FrontService(Ticker* ticker, std::shared_ptr<grpc::Channel> upstream)
      : ticker_(ticker), upstream_(std::make_unique<grpc::GenericStub>(upstream)) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  Ticker* ticker_;
  std::unique_ptr<grpc::GenericStub> upstream_;
};

}  // namespace front
