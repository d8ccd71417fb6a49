// The transport floor of a native front end: a gRPC C++ server (the callback API's generic
// service, Debian's libgrpc++ 1.51) that answers every unary call on any method with fixed bytes
// (the 480-byte DecisionResponse of uwrt.bench.transport_floor's bare Python server), no
// protobuf, no model. `python -m uwrt.bench.transport_floor --servers bare,cxx` compares the two
// on the same pinned core; build: sh bench/native/build_cxx_echo.sh (needs libgrpc++-dev).
//
//   cxx_echo [HOST:PORT]      default 127.0.0.1:0; prints "echo serving on HOST:PORT" when ready
//
// Runs until SIGTERM/SIGINT. Threads: gRPC's own (callback executor and pollers).
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <unistd.h>

namespace {

std::string BareResponse() {
  // field 1 (request_id), a 477-byte string: "bare-" then 472 'x'; length varint 0xdd 0x03
  std::string s("\x0a\xdd\x03", 3);
  s += "bare-";
  s += std::string(472, 'x');
  return s;
}

const std::string kResponse = BareResponse();

class Reactor : public grpc::ServerGenericBidiReactor {
 public:
  Reactor() { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed without a message
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
      return;
    }
    grpc::Slice slice(kResponse);
    response_ = grpc::ByteBuffer(&slice, 1);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  void OnDone() override { delete this; }

 private:
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

class Echo : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Reactor();
  }
};

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

}  // namespace

int main(int argc, char** argv) {
  std::string addr = argc > 1 ? argv[1] : "127.0.0.1:0";
  std::string host = addr.substr(0, addr.rfind(':'));
  Echo service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&service);
  builder.SetMaxReceiveMessageSize(4 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "cxx_echo: could not listen on %s\n", addr.c_str());
    return 1;
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::printf("echo serving on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);
  while (!g_stop) pause();
  server->Shutdown();
  return 0;
}
